#!/usr/bin/env bash
# Fetch the King James Bible (public domain; Debian packages bible-kjv-text + bible-kjv) and write it as
# plain text, one verse per line, without book/chapter headings or verse numbers: data/kjv.txt (31,102 lines,
# ~4.1 MB). Uses `apt-get download` + `dpkg-deb -x`: nothing is installed on the system. The corpus is never
# committed (data/ is git-ignored).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/data/kjv.txt}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download bible-kjv-text bible-kjv >/dev/null 2>&1 || { apt-get update -qq && apt-get download bible-kjv-text bible-kjv; }
for deb in ./*.deb; do dpkg-deb -x "$deb" root; done
root/usr/bin/bible -p root/usr/lib "Gen1:1-Rev22:21" > raw.txt
mkdir -p "$(dirname "$out")"
# Headings ("Genesis 1", "1 Samuel 3") are unindented and end in the chapter number; verse lines start with a
# right-aligned verse number; continuation lines are joined to their verse.
awk '/^[A-Za-z0-9 ]+ [0-9]+$/ && !/^  / { next }
     /^$/ { next }
     /^ *[0-9]+ / { if (v != "") print v; sub(/^ *[0-9]+ /, ""); v = $0; next }
     { v = v " " $0 }
     END { print v }' raw.txt > "$out"
echo "wrote $out: $(wc -l < "$out") verses, $(wc -c < "$out") bytes" >&2
