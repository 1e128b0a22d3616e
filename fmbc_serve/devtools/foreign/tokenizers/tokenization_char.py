"""A tokenizer that ships as code of its own (as some published checkpoints' do): a fast tokenizer subclass."""

from transformers import PreTrainedTokenizerFast


class CharTokenizer(PreTrainedTokenizerFast):
    """One token per character; the behaviour is the parent's, the point is that loading it runs this file."""

    model_input_names = ["input_ids", "attention_mask"]
