"""Text around the token ids: streaming detokenizer, stop strings, chat format, input files.

* :mod:`edge_slm.text.detokenizer`: token ids to text pieces, never half a character;
* :mod:`edge_slm.text.stops`: stop strings across tokens, deadlines, finish reasons;
* :mod:`edge_slm.text.chat_format`: chat messages to prompt text, as transformers renders;
* :mod:`edge_slm.text.records`: JSONL/CSV/text input files for the batch commands.
"""
