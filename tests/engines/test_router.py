"""Two vLLM replicas behind vLLM's router (vllm-router), started by the one-machine recipe examples/router.sh
(one core per replica), as clients see them: the served name on /v1/models (and the OpenAI SDK using it),
token-id prompts (lm-eval's requests included), every kind of client error staying that client's (a burst of
them, then good requests at once), load with bad requests mixed in, a replica killed under load while a
misnamed client keeps sending (the script starts it again, the router takes it back), and SIGTERM stopping all.
The recipe runs once for the module; the kill test and the SIGTERM test come last. Run with `pytest -s` to see
the figures (docs/scale-out.md quotes them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from support.engines import require
from support.load import LOAD_CLIENTS, BadRequest, LoadResult, drive_load, post
from support.servers import settled_successes, successes_by_engine

from fmbc_serve.devtools.servers import free_port

pytestmark = pytest.mark.vllm

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "router.sh"
LOAD_SECONDS = 30
GOOD = {"model": "fmbc", "prompt": "In the beginning", "max_tokens": 8}
# The status each client must get: from the replica (vLLM's checks), or from the router itself (a body it cannot
# parse). None of them may count against a replica.
BAD_REQUESTS: list[BadRequest] = [
    ("wrong model name", "/v1/completions", {**GOOD, "model": "no-such-model"}, 404),
    ("wrong model name, streamed", "/v1/completions", {**GOOD, "model": "no-such-model", "stream": True}, 404),
    ("wrong model name, chat", "/v1/chat/completions",
     {"model": "no-such-model", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}, 404),
    ("token id out of vocabulary", "/v1/completions", {**GOOD, "prompt": [1, 2, 100000]}, 400),
    ("max_tokens past the context", "/v1/completions", {**GOOD, "max_tokens": 100000}, 400),
    ("n > 1 at temperature 0", "/v1/completions", {**GOOD, "n": 2, "temperature": 0}, 400),
    ("negative temperature", "/v1/completions", {**GOOD, "temperature": -1}, 400),
    ("no prompt", "/v1/completions", {"model": "fmbc", "max_tokens": 8}, 422),
    ("not JSON", "/v1/completions", b'{"model": "fmbc", "prompt": ', 400),
]


@dataclass
class Recipe:
    """examples/router.sh running: the router's URL, the replicas' URLs, where it keeps logs and pid files."""

    process: subprocess.Popen
    url: str
    replicas: list[str]
    metrics: str
    log_dir: Path
    output: Path

    def replica_pid(self, index: int) -> int:
        return int((self.log_dir / f"replica-{index}.pid").read_text())

    def groups(self) -> list[int]:
        """The replicas' process groups (each replica runs in its own session) and the script's."""
        return [self.replica_pid(i) for i in range(len(self.replicas))] + [self.process.pid]


def start_recipe(checkpoint: str, tmp_dir: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    port, metrics_port, replica_ports = free_port(), free_port(), [free_port(), free_port()]
    env = {**os.environ, "PYTHON": sys.executable, "REPLICA_PORTS": " ".join(map(str, replica_ports)),
           "METRICS_PORT": str(metrics_port), "LOG_DIR": str(tmp_dir / "logs")}
    with open(tmp_dir / "router.sh.log", "w") as out:
        process = subprocess.Popen(["bash", str(RECIPE), checkpoint, str(port)], stdout=out, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
    return process, {"url": f"http://127.0.0.1:{port}", "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
                     "replicas": [f"http://127.0.0.1:{p}" for p in replica_ports]}


def gone(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def recipe(tiny_checkpoints: dict[str, str], tmp_path_factory) -> Recipe:
    require("vllm")
    require("vllm_router")
    tmp_dir = tmp_path_factory.mktemp("router")
    process, where = start_recipe(tiny_checkpoints["binary"], tmp_dir)
    recipe = Recipe(process, where["url"], where["replicas"], where["metrics"], tmp_dir / "logs",
                    tmp_dir / "router.sh.log")
    deadline = time.monotonic() + 600
    while "router.sh: ready at" not in recipe.output.read_text():
        assert process.poll() is None and time.monotonic() < deadline, recipe.output.read_text()[-5000:]
        time.sleep(1)
    yield recipe
    if process.poll() is None:  # the SIGTERM test did not run (or failed): stop it the same way
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            for group in recipe.groups():
                if not gone(group):
                    os.killpg(group, signal.SIGKILL)


def router_counter(recipe: Recipe, name: str, **labels: str) -> float:
    """The router's Prometheus counter `name`, summed over the series whose labels include `labels`."""
    total = 0.0
    for line in requests.get(recipe.metrics, timeout=10).text.splitlines():
        match = re.match(rf"{name}{{(.*)}} (\S+)$", line)
        if match and all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
            total += float(match.group(2))
    return total


def healthy_workers(router_url: str) -> list[str]:
    return sorted(w["url"] for w in requests.get(router_url + "/workers", timeout=10).json()["workers"]
                  if w["is_healthy"])


def test_a_replica_that_cannot_start_fails_the_recipe(tiny_checkpoints: dict[str, str], tmp_path: Path) -> None:
    """A checkpoint whose config.json the model class refuses: the script names the replica, quotes its log (with
    the reason), stops the other replica and exits 1."""
    require("vllm")
    broken = tmp_path / "bad-config"
    shutil.copytree(tiny_checkpoints["binary"], broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "input_mode": "nonsense"}))
    process, _ = start_recipe(str(broken), tmp_path)
    assert process.wait(timeout=600) == 1
    output = (tmp_path / "router.sh.log").read_text()
    assert re.search(r"router.sh: replica \d \(port \d+, core \d\) failed to start: exited with status [1-9]", output)
    assert "Last lines of" in output and "input_mode: must be one of" in output, output[-3000:]
    pids = [int(p.read_text()) for p in (tmp_path / "logs").glob("replica-*.pid")]
    assert len(pids) == 2 and all(gone(pid) for pid in pids)


def test_models_lists_the_served_name_and_an_sdk_client_uses_it(recipe: Recipe) -> None:
    from openai import OpenAI

    reply = requests.get(recipe.url + "/v1/models", timeout=10)
    assert reply.status_code == 200 and [m["id"] for m in reply.json()["data"]] == ["fmbc"], reply.text
    client = OpenAI(base_url=recipe.url + "/v1", api_key="unused")
    (model,) = [m.id for m in client.models.list()]
    completion = client.completions.create(model=model, prompt="In the beginning", max_tokens=8)
    assert completion.model == "fmbc" and completion.usage.completion_tokens == 8
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
    assert chat.usage.completion_tokens == 8


def test_token_id_prompts_pass_through_unchanged(recipe: Recipe) -> None:
    """Token-id prompts (one, or a batch) and lm-eval's scoring request (echo + logprobs) get through the
    router and answer exactly as a replica answers them directly."""
    ids = [72, 101, 108, 108, 111, 300, 5]
    requests_ = [{**GOOD, "prompt": ids, "temperature": 0},
                 {**GOOD, "prompt": [ids, ids[:3]], "temperature": 0},
                 {"model": "fmbc", "prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}]
    for body in requests_:
        through, direct = post(recipe.url, "/v1/completions", body), post(recipe.replicas[0], "/v1/completions", body)
        assert through.status_code == direct.status_code == 200, through.text
        assert [c["text"] for c in through.json()["choices"]] == [c["text"] for c in direct.json()["choices"]]
        assert ([c["logprobs"] for c in through.json()["choices"]]
                == [c["logprobs"] for c in direct.json()["choices"]])
        assert through.json()["usage"]["prompt_tokens"] == direct.json()["usage"]["prompt_tokens"]


def test_lm_eval_with_token_id_requests_through_the_router(recipe: Recipe, tiny_checkpoints: dict[str, str]) -> None:
    """lm-eval's local-completions as it runs by default (tokenized_requests=True: prompts sent as token ids),
    with the checkpoint's own tokenizer, on the examples' local task."""
    require("lm_eval")
    task = Path(__file__).resolve().parents[2] / "examples" / "lm_eval_task"
    model_args = (f"model=fmbc,base_url={recipe.url}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={tiny_checkpoints['binary']},tokenized_requests=True,num_concurrent=2,max_retries=1")
    result = subprocess.run([str(Path(sys.executable).parent / "lm_eval"), "--model", "local-completions",
                             "--model_args", model_args, "--include_path", str(task), "--tasks", "kjv_cloze",
                             "--batch_size", "1"], capture_output=True, text=True, cwd=task, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert re.search(r"\|kjv_cloze\|.*\|acc\s*\|", result.stdout), result.stdout[-2000:]


@pytest.mark.parametrize(("kind", "path", "body", "status"), BAD_REQUESTS,
                         ids=[re.sub(r"\W+", "-", b[0]).strip("-") for b in BAD_REQUESTS])
def test_a_burst_of_client_errors_leaves_every_replica_serving(recipe: Recipe, kind: str, path: str,
                                                              body: dict | bytes, status: int) -> None:
    """Twenty of one bad request at once (ten for each replica: its circuit breaker's threshold), then sixteen
    good ones at once: every bad one gets its 4xx, no answer counts as a replica failure in the router's
    circuit breakers, every good one gets 200, both replicas stay in."""
    outcomes = {o: router_counter(recipe, "vllm_router_cb_outcomes_total", outcome=o) for o in ("success", "failure")}
    with ThreadPoolExecutor(20) as pool:
        bad = list(pool.map(lambda _: post(recipe.url, path, body), range(20)))
    assert {r.status_code for r in bad} == {status}, bad[0].text
    if status == 404:
        assert "The model `no-such-model` does not exist" in bad[0].json()["error"]["message"]
    assert router_counter(recipe, "vllm_router_cb_outcomes_total", outcome="failure") == outcomes["failure"]
    assert router_counter(recipe, "vllm_router_cb_state_transitions_total", to="open") == 0
    with ThreadPoolExecutor(16) as pool:
        good = list(pool.map(lambda _: post(recipe.url, "/v1/completions", GOOD), range(16)))
    assert [r.status_code for r in good] == [200] * 16, {r.status_code: r.text[:200] for r in good}
    assert router_counter(recipe, "vllm_router_cb_outcomes_total", outcome="success") >= outcomes["success"] + 16
    assert healthy_workers(recipe.url) == sorted(recipe.replicas)


def test_load_with_bad_requests_of_every_kind(recipe: Recipe) -> None:
    """Good and bad clients together: no good request fails, every bad one gets its 4xx, and none counts as a
    replica failure."""
    failures = router_counter(recipe, "vllm_router_cb_outcomes_total", outcome="failure")
    load = drive_load(recipe.url, GOOD["model"], BAD_REQUESTS, LOAD_SECONDS / 2)
    good, bad = load.summary(), load.summary(bad=True)
    print("\nload with bad requests: " + json.dumps({"good": good, "bad": bad}, indent=1))
    assert good["failed"] == 0 and good["ok"] > 0
    assert bad["otherwise"] == 0 and bad["sent"] >= len(BAD_REQUESTS)
    assert router_counter(recipe, "vllm_router_cb_outcomes_total", outcome="failure") == failures
    assert healthy_workers(recipe.url) == sorted(recipe.replicas)


def test_replica_kill_under_load_with_a_misnamed_client(recipe: Recipe) -> None:
    """SIGKILL to one replica (and its engine process) a third of the way into a load run with bad clients:
    only requests in flight around the kill may fail; then the survivor serves everything, the script starts
    the replica again, and the router takes it back."""
    urls = recipe.replicas
    before = settled_successes(urls[0])
    cb_failures = router_counter(recipe, "vllm_router_cb_outcomes_total", outcome="failure")
    kill = {}

    def kill_second_replica(result: LoadResult) -> None:
        time.sleep(LOAD_SECONDS / 3)
        kill["at"], kill["pid"] = time.monotonic(), recipe.replica_pid(1)
        os.killpg(kill["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while urls[1] in healthy_workers(recipe.url) and time.monotonic() < deadline:
            time.sleep(0.2)
        kill["out_at"] = time.monotonic()
        kill["taken_out"] = urls[1] not in healthy_workers(recipe.url)

    killed = drive_load(recipe.url, GOOD["model"], BAD_REQUESTS, LOAD_SECONDS, during=kill_second_replica)
    failures = [r for r in killed.records if not r["bad"] and not r["ok"]]
    survivor_gain = settled_successes(urls[0]) - before

    # the script starts the replica again on the same port; the router takes it in again
    deadline = time.monotonic() + 400
    while (recipe.replica_pid(1) == kill["pid"] or urls[1] not in healthy_workers(recipe.url)) \
            and time.monotonic() < deadline:
        time.sleep(1)
    rejoined = time.monotonic()
    back = drive_load(recipe.url, GOOD["model"], BAD_REQUESTS, 10)
    back_on_replica = successes_by_engine(urls[1]).get("0", 0.0)

    window_start, window_end = kill["at"] - 10, kill["out_at"] + 2
    report = {"kill": killed.summary(), "bad clients": killed.summary(bad=True),
              "after the router took it out": killed.summary(since=window_end),
              "after the restart (10 s)": back.summary(),
              "failed while the replica went down": len(failures),
              "errors": sorted({r["error"].split(":")[0] for r in failures}),
              "seconds to leave the router": round(kill["out_at"] - kill["at"], 2),
              "seconds until back in the router": round(rejoined - kill["at"], 1),
              "replica failures the circuit breakers counted": router_counter(
                  recipe, "vllm_router_cb_outcomes_total", outcome="failure") - cb_failures,
              "circuits opened": router_counter(recipe, "vllm_router_cb_state_transitions_total", to="open")}
    print("\nreplica kill with a misnamed client: " + json.dumps(report, indent=1))
    assert kill["taken_out"], "the router still lists the killed replica as healthy"
    # only requests in flight around the kill may fail, each with an error, never more than the clients
    assert all(window_start <= r["start"] <= window_end for r in failures), failures
    assert len(failures) <= LOAD_CLIENTS and all(r["error"] for r in failures)
    assert report["bad clients"]["otherwise"] == 0
    # after the router took the replica out, every request succeeded, on the survivor. A stream the client cut
    # may be aborted before it finishes, and vLLM counts only finished requests: compare the uncut ones.
    assert report["after the router took it out"]["failed"] == 0 and report["after the router took it out"]["ok"] > 0
    finished_after = sum(1 for r in killed.records
                         if not r["bad"] and r["ok"] and not r["cut"] and r["start"] >= window_end)
    assert survivor_gain >= finished_after
    # the script restarted the replica; the router takes it in again and sends it requests
    assert re.search(r"replica 1 \(port \d+\) exited with status 137; starting it again", recipe.output.read_text())
    assert urls[1] in healthy_workers(recipe.url)
    assert back.summary()["failed"] == 0 and back_on_replica > 0


def test_sigterm_stops_the_router_and_every_replica(recipe: Recipe) -> None:
    groups = recipe.groups()
    os.kill(recipe.process.pid, signal.SIGTERM)
    assert recipe.process.wait(timeout=120) == 0, recipe.output.read_text()[-3000:]
    assert all(gone(group) for group in groups)
    for url in [recipe.url, *recipe.replicas]:
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/health", timeout=5)
