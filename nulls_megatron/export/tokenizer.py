"""Our sentencepiece tokenizer as a Hugging Face tokenizer that ``AutoTokenizer`` loads offline.

The prep trains sentencepiece BPE the Llama way (identity normalisation, a dummy-prefix ``▁``, spaces
kept, byte fallback; data_prep/tokenizer.py). The converted ``tokenizer.json`` reproduces it with the
``tokenizers`` library: the BPE vocabulary and merges read from the model proto by transformers'
``SentencePieceExtractor``; a normaliser that always prepends ``▁`` and turns spaces into ``▁`` (a
``Metaspace`` pre-tokenizer would skip the prefix when the text already starts with a space, which
sentencepiece does not); byte fallback; a decoder that undoes both. No BOS or EOS is added: our
training documents carry neither. ``tokenizer.model`` is copied beside it for sentencepiece users.
Equality of the ids on real text is tested (tests/test_export.py).
"""
from __future__ import annotations

import shutil
from pathlib import Path

SPIECE_NAME = "tokenizer.model"


def _piece(sp, token_id: int) -> str | None:
    return sp.id_to_piece(token_id) if token_id >= 0 else None


def export_tokenizer(spm_path: Path, out: Path, model_max_length: int) -> dict[str, int | None]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``tokenizer.model`` into ``out``.

    Returns the special token ids (``bos_token_id``, ``eos_token_id``, ``unk_token_id``,
    ``pad_token_id``; None when the model has none) for the model config.
    """
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    proto = SentencePieceExtractor(str(spm_path))
    if proto.proto.trainer_spec.model_type != 2:
        raise ValueError(f"{spm_path}: a sentencepiece {proto.proto.trainer_spec.model_type=} model; the export "
                         "converts BPE models (tokenizer.model_type: bpe, the prep's default)")
    pieces = proto.extract(BPE)
    tokenizer = Tokenizer(BPE(vocab=pieces["vocab"], merges=pieces["merges"], unk_token=sp.id_to_piece(sp.unk_id()),
                              fuse_unk=True, byte_fallback=bool(proto.proto.trainer_spec.byte_fallback)))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1)])
    specials = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, model_max_length=model_max_length, add_bos_token=False, add_eos_token=False,
        **{f"{name}_token": _piece(sp, i) for name, i in specials.items() if i >= 0},
    )
    fast.save_pretrained(str(out))
    shutil.copyfile(spm_path, out / SPIECE_NAME)
    return {f"{name}_token_id": (i if i >= 0 else None) for name, i in specials.items()}
