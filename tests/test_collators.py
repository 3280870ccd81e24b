"""Collators and packing against transformers' collators on the same inputs, plus invariants.

The tokenizer is a WordPiece model trained here on generated sentences: nothing is downloaded.
"""
from __future__ import annotations

import doctest
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

import jtrain.data.collators as collators_module
import jtrain.data.packing as packing_module
import jtrain.data.tokenizer_info as tokenizer_info_module
from jtrain.data.collators import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    DefaultDataCollator,
    default_length_buckets,
    tokenizer_info,
)
from jtrain.data.packing import (
    DataCollatorForCompletionOnlyLM,
    DataCollatorWithFlattening,
    completion_only_labels,
    group_texts,
    pack_documents,
)

transformers = pytest.importorskip("transformers")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("the a cat dog sat on mat ran fast slow jax flax train step loss grad shard mesh device host "
         "batch token model layer head sum mean weight bias norm scale learn rate warm decay").split()


def _sentences(n: int, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(2, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def raw_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_sentences(400), trainers.WordPieceTrainer(vocab_size=120, special_tokens=SPECIALS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


@pytest.fixture(scope="module")
def hf_tokenizer(raw_tokenizer: Tokenizer):
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw_tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]")


def _features(tok, n: int = 6, seed: int = 1, pairs: bool = False) -> list[dict]:
    texts = _sentences(n, seed)
    enc = tok(texts[: n // 2], texts[n // 2:]) if pairs else tok(texts)
    return [{k: enc[k][i] for k in enc} for i in range(len(enc["input_ids"]))]


def _assert_same_batch(ours: dict, ref: dict, extra: tuple[str, ...] = ()) -> None:
    """Exact equality (integer data: no tolerance), same keys (plus ``extra`` of ours), our ints int32."""
    assert set(ours) == set(ref) | set(extra), (sorted(ours), sorted(ref))
    for key in ref:
        np.testing.assert_array_equal(ours[key], np.asarray(ref[key]), err_msg=key)
        if ours[key].dtype.kind in "iu":
            assert ours[key].dtype == np.int32, key


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("padding,max_length", [(True, None), ("longest", None), ("max_length", 40)])
@pytest.mark.parametrize("multiple", [None, 8])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_matches_hf(hf_tokenizer, padding, max_length, multiple, side):
    hf_tokenizer.padding_side = side
    try:
        feats = _features(hf_tokenizer, pairs=True)
        for f, label in zip(feats, range(len(feats))):
            f["label"] = label
        kwargs = dict(padding=padding, max_length=max_length, pad_to_multiple_of=multiple)
        ref = transformers.DataCollatorWithPadding(hf_tokenizer, return_tensors="np", **kwargs)(feats)
        _assert_same_batch(DataCollatorWithPadding(hf_tokenizer, **kwargs)(feats), ref)
    finally:
        hf_tokenizer.padding_side = "right"


def test_raw_tokenizer_and_explicit_pad_id_match_hf(hf_tokenizer, raw_tokenizer):
    feats = _features(hf_tokenizer)
    ref = DataCollatorWithPadding(hf_tokenizer)(feats)
    _assert_same_batch(DataCollatorWithPadding(raw_tokenizer)(feats), ref)
    _assert_same_batch(DataCollatorWithPadding(None, pad_token_id=hf_tokenizer.pad_token_id)(feats), ref)
    info_hf, info_raw = tokenizer_info(hf_tokenizer), tokenizer_info(raw_tokenizer)
    assert info_hf == info_raw  # same pad/mask/special ids and vocabulary size from either tokenizer type


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_classification_matches_hf(hf_tokenizer, side):
    hf_tokenizer.padding_side = side
    try:
        feats = _features(hf_tokenizer)
        for i, f in enumerate(feats):
            f["labels"] = [(i + j) % 5 for j in range(len(f["input_ids"]))]
        ref = transformers.DataCollatorForTokenClassification(hf_tokenizer, return_tensors="np",
                                                              pad_to_multiple_of=8)(feats)
        ours = DataCollatorForTokenClassification(hf_tokenizer, pad_to_multiple_of=8)(feats)
        _assert_same_batch(ours, ref)
        assert (ours["labels"][ours["attention_mask"] == 0] == -100).all()
    finally:
        hf_tokenizer.padding_side = "right"


def test_float_label_vectors_are_stacked_not_padded(hf_tokenizer):
    feats = _features(hf_tokenizer, n=3)
    for f in feats:
        f["labels"] = [0.0, 1.0, 1.0]  # multi-label targets: one float per class, not per token
    ref = transformers.DataCollatorWithPadding(hf_tokenizer, return_tensors="np")(feats)
    ours = DataCollatorWithPadding(hf_tokenizer)(feats)
    _assert_same_batch(ours, ref)
    assert ours["labels"].dtype == np.float32


def test_default_collator_matches_hf():
    feats = [{"x": [1, 2, 3], "label": 1, "name": "a"}, {"x": [4, 5, 6], "label": 0, "name": "b"}]
    _assert_same_batch(DefaultDataCollator()(feats), transformers.default_data_collator(feats, "np"))
    feats = [{"x": np.arange(3), "label_ids": [0.5, 1.0]}, {"x": np.arange(3), "label_ids": [1.5, 2.0]}]
    ours = DefaultDataCollator()(feats)
    _assert_same_batch(ours, transformers.default_data_collator(feats, "np"))
    assert ours["labels"].dtype == np.float32


# ----------------------------------------------------------------------------- buckets and bad input


def test_buckets_pick_smallest_fitting_bucket():
    collate = DataCollatorWithPadding(pad_token_id=0, length_buckets=(8, 16, 32))
    rnd = np.random.default_rng(0)
    for _ in range(50):
        lengths = rnd.integers(1, 33, size=int(rnd.integers(1, 6)))
        batch = collate([{"input_ids": list(range(1, n + 1))} for n in lengths])
        expected = min(b for b in (8, 16, 32) if b >= lengths.max())
        assert batch["input_ids"].shape == (len(lengths), expected)
        np.testing.assert_array_equal(batch["attention_mask"].sum(1), lengths)


def test_default_length_buckets():
    assert default_length_buckets(512) == (64, 128, 256, 512)
    assert default_length_buckets(600, multiple=64) == (64, 128, 256, 512, 600)
    assert default_length_buckets(48) == (48,)
    assert default_length_buckets(256, multiple=32, growth=1.5) == (32, 64, 96, 160, 256)


def test_bucket_and_max_length_errors_name_row_and_length():
    with pytest.raises(ValueError, match=r"row 1 has length 40.*largest length bucket \(32\)"):
        DataCollatorWithPadding(pad_token_id=0, length_buckets=(16, 32))([{"input_ids": [1]}, {"input_ids": [1] * 40}])
    with pytest.raises(ValueError, match=r"row 2 has length 11.*max_length \(10\)"):
        DataCollatorWithPadding(pad_token_id=0, padding="max_length", max_length=10)(
            [{"input_ids": [1]}, {"input_ids": [1] * 3}, {"input_ids": [1] * 11}])
    with pytest.raises(ValueError, match="not multiples of pad_to_multiple_of"):
        DataCollatorWithPadding(pad_token_id=0, length_buckets=(16, 20), pad_to_multiple_of=8)
    with pytest.raises(ValueError, match="largest length bucket 64 exceeds max_length=32"):
        DataCollatorWithPadding(pad_token_id=0, max_length=32, length_buckets=(16, 64))
    with pytest.raises(ValueError, match="only with padding=True"):
        DataCollatorWithPadding(pad_token_id=0, padding="max_length", max_length=8, length_buckets=(8,))


def test_missing_input_ids_names_present_keys():
    with pytest.raises(KeyError, match=r"feature 1 has no 'input_ids' key; keys present: \['attention_mask', 'ids'\]"):
        DataCollatorWithPadding(pad_token_id=0)([{"input_ids": [1]}, {"ids": [1], "attention_mask": [1]}])
    with pytest.raises(ValueError, match="no pad token"):
        DataCollatorWithPadding()([{"input_ids": [1]}, {"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="equal length"):
        DataCollatorWithPadding(pad_token_id=0, padding=False)([{"input_ids": [1]}, {"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="return_tensors must be 'np'"):
        DataCollatorWithPadding(pad_token_id=0, return_tensors="pt")


# ----------------------------------------------------------------------------- language modelling


@pytest.mark.parametrize("as_lists", [False, True])
@pytest.mark.parametrize("probs", [(0.8, 0.1), (1.0, 0.0), (0.5, 0.4)])
def test_mlm_bit_identical_to_hf_numpy_path(hf_tokenizer, raw_tokenizer, as_lists, probs):
    """Same Generator state -> same masks: our draws follow HF's numpy path call for call."""
    feats = _features(hf_tokenizer, n=8, seed=3)
    if as_lists:
        feats = [f["input_ids"] for f in feats]
    kwargs = dict(mlm_probability=0.3, mask_replace_prob=probs[0], random_replace_prob=probs[1], pad_to_multiple_of=8)
    ref = transformers.DataCollatorForLanguageModeling(hf_tokenizer, return_tensors="np", seed=7, **kwargs)(feats)
    for tok in (hf_tokenizer, raw_tokenizer):
        ours = DataCollatorForLanguageModeling(tok, **kwargs)(feats, rng=np.random.default_rng(7))
        # HF returns no attention_mask for list inputs; jtrain always does (the model needs the padding).
        _assert_same_batch(ours, ref, extra=("attention_mask",) if as_lists else ())


@pytest.mark.parametrize("side", ["right", "left"])
def test_whole_word_mask_bit_identical_to_hf_numpy_path(hf_tokenizer, raw_tokenizer, side):
    """HF 5's `DataCollatorForLanguageModeling(whole_word_mask=True)` reads each feature's offset_mapping and
    masks every piece of a drawn word; jtrain's collator had no such argument (a TypeError). Same Generator
    state, same draws: the batches agree exactly. HF's pad does not pad offset_mapping, so its reference
    features are tokenized to one length."""
    texts = [t.replace("a", "abracadabra").replace("o", "ooooo") for t in _sentences(8, seed=5)]  # words in pieces
    enc = hf_tokenizer(texts, return_offsets_mapping=True, padding="max_length", max_length=48, truncation=True)
    feats = [{k: enc[k][i] for k in ("input_ids", "attention_mask", "offset_mapping")} for i in range(len(texts))]
    kwargs = dict(mlm_probability=0.3, whole_word_mask=True)
    hf_tokenizer.padding_side = side
    try:
        ref = transformers.DataCollatorForLanguageModeling(hf_tokenizer, return_tensors="np", seed=11,
                                                           **kwargs)(feats)
    finally:
        hf_tokenizer.padding_side = "right"
    for tok in (hf_tokenizer, raw_tokenizer):
        with pytest.warns(UserWarning, match="Setting mask_replace_prob to 1"):  # HF's rule: every pick a [MASK]
            collator = DataCollatorForLanguageModeling(tok, padding_side=side, **kwargs)
        _assert_same_batch(collator(feats, rng=np.random.default_rng(11)), ref)
    original = np.asarray([f["input_ids"] for f in feats]).ravel()
    pieces = [t.startswith("##") for t in hf_tokenizer.convert_ids_to_tokens(original.tolist())]
    labels = ref["labels"].ravel()
    continued = np.flatnonzero(np.array(pieces[1:]) & (labels[1:] != -100))  # a masked word piece ...
    assert continued.size and (labels[continued] != -100).all()  # ... whose word's first piece is masked too
    ragged = [{k: v[: sum(f["attention_mask"]) - i] for k, v in f.items()} for i, f in enumerate(feats)]
    ours = collator(ragged, rng=np.random.default_rng(11))  # jtrain also pads offset_mapping (HF's pad cannot)
    assert "offset_mapping" not in ours and ours["input_ids"].shape[0] == len(feats)
    with pytest.raises(ValueError, match="return_offsets_mapping=True"):
        collator([{"input_ids": f["input_ids"]} for f in feats])


@pytest.mark.parametrize("multiple", [None, 8])
def test_seq2seq_collator_pads_like_hfs_for_decoder_only_rows(hf_tokenizer, multiple):
    """HF's DataCollatorForSeq2Seq(tokenizer, model) pads rows that carry their own labels (prompt tokens -100,
    as decoder-only fine-tuning data is prepared): inputs with the pad id, labels with -100. jtrain had none."""
    feats = _features(hf_tokenizer, n=6, seed=4)
    for f in feats:
        f["labels"] = [-100] * 2 + list(f["input_ids"][2:])
    ref = transformers.DataCollatorForSeq2Seq(hf_tokenizer, None, return_tensors="np", pad_to_multiple_of=multiple)
    ours = DataCollatorForSeq2Seq(hf_tokenizer, None, pad_to_multiple_of=multiple)
    _assert_same_batch(ours(feats), ref(feats))
    feats[0]["labels"] = feats[0]["labels"][:-1]
    with pytest.raises(ValueError, match=r"features \[0\] have labels of another length"):
        ours(feats)


def test_clm_labels_match_hf(hf_tokenizer):
    feats = _features(hf_tokenizer, n=5)
    ref = transformers.DataCollatorForLanguageModeling(hf_tokenizer, mlm=False, return_tensors="np")(feats)
    _assert_same_batch(DataCollatorForLanguageModeling(hf_tokenizer, mlm=False)(feats), ref)


def test_clm_keeps_real_tokens_equal_to_pad_id():
    """pad = eos is common for causal LMs: only padding positions lose their label, not real EOS tokens."""
    batch = DataCollatorForLanguageModeling(None, mlm=False, pad_token_id=2)([[5, 6, 2], [7, 2]])
    assert batch["labels"].tolist() == [[5, 6, 2], [7, 2, -100]]


def _mlm_sample(hf_tokenizer, rows: int, seed: int) -> list[list[int]]:
    """Random content ids between [CLS] ... [SEP], with some [UNK] inside and ragged lengths."""
    rnd = np.random.default_rng(seed)
    special = set(hf_tokenizer.all_special_ids)
    content = np.array([i for i in range(len(hf_tokenizer)) if i not in special])
    out = []
    for _ in range(rows):
        ids = rnd.choice(content, size=int(rnd.integers(200, 513)))
        ids[rnd.random(ids.size) < 0.02] = hf_tokenizer.unk_token_id
        out.append([hf_tokenizer.cls_token_id, *ids.tolist(), hf_tokenizer.sep_token_id])
    return out


def _within_sigmas(count: int, n: int, p: float, sigmas: float) -> bool:
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def test_mlm_masking_statistics(hf_tokenizer):
    """Over 200k maskable tokens. Bounds are 5 binomial standard deviations: a correct sampler fails one
    of these checks with probability ~6e-7 each, while a wrong rate (e.g. 0.14 vs 0.15) is ~13 sigma off."""
    rows = _mlm_sample(hf_tokenizer, rows=640, seed=11)
    collate = DataCollatorForLanguageModeling(hf_tokenizer, seed=3)
    original = DataCollatorWithPadding(hf_tokenizer)([{"input_ids": r} for r in rows])["input_ids"]
    batch = collate(rows)
    special = np.isin(original, hf_tokenizer.all_special_ids)  # includes [PAD] on padding positions
    selected = batch["labels"] != -100
    assert not (selected & special).any(), "a special token or padding position was selected"
    np.testing.assert_array_equal(batch["input_ids"][special], original[special])
    np.testing.assert_array_equal(batch["labels"][selected], original[selected])
    n_maskable, n_selected = int((~special).sum()), int(selected.sum())
    assert n_maskable > 200_000
    assert _within_sigmas(n_selected, n_maskable, 0.15, 5)
    vocab, new = len(hf_tokenizer), batch["input_ids"][selected]
    # A random replacement is itself [MASK] or the original id with probability 1/vocab each.
    p_mask, p_same = 0.8 + 0.1 / vocab, 0.1 + 0.1 / vocab
    n_mask, n_same = int((new == hf_tokenizer.mask_token_id).sum()), int((new == original[selected]).sum())
    assert _within_sigmas(n_mask, n_selected, p_mask, 5)
    assert _within_sigmas(n_same, n_selected, p_same, 5)
    assert _within_sigmas(n_selected - n_mask - n_same, n_selected, 1 - p_mask - p_same, 5)
    assert ((new >= 0) & (new < vocab)).all()


def test_mlm_is_deterministic_per_seed_and_step(hf_tokenizer):
    rows = _mlm_sample(hf_tokenizer, rows=4, seed=0)
    a, b = DataCollatorForLanguageModeling(hf_tokenizer, seed=5), DataCollatorForLanguageModeling(hf_tokenizer, seed=5)
    a.set_step(9)
    b.set_step(9)
    first = a(rows)
    _assert_same_batch(b(rows), first)
    _assert_same_batch(a(rows), b(rows))  # both advanced to step 10
    c = DataCollatorForLanguageModeling(hf_tokenizer, seed=5)
    _assert_same_batch(c(rows, rng=c.rng_for_step(9)), first)
    c.set_step(10)
    assert not np.array_equal(c(rows)["labels"], first["labels"])  # another step, other masks
    d = DataCollatorForLanguageModeling(hf_tokenizer, seed=6)
    d.set_step(9)
    assert not np.array_equal(d(rows)["labels"], first["labels"])  # another seed, other masks


def test_mlm_never_masks_provided_special_tokens_mask(hf_tokenizer):
    rows = _mlm_sample(hf_tokenizer, rows=16, seed=2)
    feats = [{"input_ids": r, "special_tokens_mask": [1] * 50 + [0] * (len(r) - 50)} for r in rows]
    batch = DataCollatorForLanguageModeling(hf_tokenizer, mlm_probability=0.9)(feats)
    assert "special_tokens_mask" not in batch
    assert (batch["labels"][:, :50] == -100).all() and (batch["labels"][:, 50:] != -100).any()


# ----------------------------------------------------------------------------- packing


def test_group_texts_matches_run_clm_semantics():
    examples = {"input_ids": [[1, 2, 3], [4, 5, 6, 7], [8]], "attention_mask": [[1] * 3, [1] * 4, [1]]}
    out = group_texts(examples, 3)
    assert out == {"input_ids": [[1, 2, 3], [4, 5, 6]], "attention_mask": [[1] * 3] * 2,
                   "labels": [[1, 2, 3], [4, 5, 6]]}  # 8 tokens -> two blocks, remainder [7, 8] dropped
    assert group_texts({"input_ids": [[1, 2]]}, 3) == {"input_ids": [], "labels": []}
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(examples).map(lambda b: group_texts(b, 2), batched=True)
    assert ds["input_ids"] == [[1, 2], [3, 4], [5, 6], [7, 8]]


def _check_packed(packed: dict, pieces: list[list[int]], block_size: int) -> None:
    """Segments, positions and labels of packed rows reproduce the pieces with no cross-boundary label."""
    ids, seg, pos, lab = (packed[k] for k in ("input_ids", "segment_ids", "position_ids", "labels"))
    assert all(v.shape == (ids.shape[0], block_size) and v.dtype == np.int32 for v in packed.values())
    np.testing.assert_array_equal(packed["attention_mask"], (seg > 0).astype(np.int32))
    recovered = []
    for r in range(ids.shape[0]):
        n_seg = int(seg[r].max())
        used = int((seg[r] > 0).sum())
        np.testing.assert_array_equal(seg[r, used:], 0)  # padding only at the end
        for s in range(1, n_seg + 1):
            where = np.flatnonzero(seg[r] == s)
            assert (np.diff(where) == 1).all()  # contiguous
            np.testing.assert_array_equal(pos[r, where], np.arange(where.size))
            assert lab[r, where[0]] == -100
            recovered.append(ids[r, where].tolist())
    assert recovered == pieces
    # Shifted loss: logits at t score labels[t+1]; a scored pair must stay inside one segment.
    scored = lab[:, 1:] != -100
    assert (seg[:, :-1][scored] == seg[:, 1:][scored]).all() and (seg[:, 1:][scored] > 0).all()
    assert int(scored.sum()) == sum(len(p) - 1 for p in pieces)  # same count as unpacked training


def test_pack_documents_segments_positions_labels():
    rnd = np.random.default_rng(4)
    docs = [rnd.integers(5, 100, size=int(rnd.integers(0, 40))).tolist() for _ in range(60)]
    block = 32
    packed = pack_documents(docs, block, pad_id=0)
    pieces = [d[s:s + block] for d in docs for s in range(0, len(d), block)]  # 'split' cuts long documents
    _check_packed(packed, pieces, block)
    trunc = pack_documents(docs, block, pad_id=0, overflow="truncate")
    _check_packed(trunc, [d[:block] for d in docs if d], block)
    long_doc = next(i for i, d in enumerate(docs) if len(d) > block)
    with pytest.raises(ValueError, match=f"document {long_doc} has length {len(docs[long_doc])}"):
        pack_documents(docs, block, pad_id=0, overflow="error")
    assert pack_documents([], 8, pad_id=0)["input_ids"].shape == (0, 8)


def test_pack_documents_with_completion_labels():
    prompt_completion = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9])]
    rows = [completion_only_labels(p, c) for p, c in prompt_completion]
    packed = pack_documents([r["input_ids"] for r in rows], 12, pad_id=0, labels=[r["labels"] for r in rows])
    assert packed["labels"].tolist() == [[-100, -100, -100, 4, 5, -100, 7, 8, 9, -100, -100, -100]]


@pytest.mark.parametrize("with_labels", [False, True])
def test_flattening_matches_hf(with_labels):
    feats = [{"input_ids": [5, 6, 7]}, {"input_ids": []}, {"input_ids": [8, 9]}, {"input_ids": [10]}]
    if with_labels:
        for f in feats:
            f["labels"] = [-100] + f["input_ids"][1:] if f["input_ids"] else []
    ref = transformers.DataCollatorWithFlattening(return_tensors="np")(feats)
    ours = DataCollatorWithFlattening()(feats)
    for key in ("input_ids", "labels", "position_ids"):
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    assert ours["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 3]]
    padded = DataCollatorWithFlattening(pad_token_id=0, length_buckets=(4, 8, 16))(feats)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 0, 0]]
    assert padded["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]
    assert padded["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 3, 0, 0]]
    with pytest.raises(ValueError, match=r"length 6, longer than max_length \(5\)"):
        DataCollatorWithFlattening(max_length=5)(feats)


# ----------------------------------------------------------------------------- completion-only


def test_completion_only_collator_formats_agree():
    pairs = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9, 10])]
    expected_labels = [[-100, -100, -100, 4, 5, -100, -100, -100], [-100, 7, 8, 9, 10, -100, -100, -100]]
    collate = DataCollatorForCompletionOnlyLM(pad_token_id=0, length_buckets=(8, 16))
    a = collate([{"prompt_ids": p, "completion_ids": c} for p, c in pairs])
    b = collate([{"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)} for p, c in pairs])
    assert a["labels"].tolist() == expected_labels
    _assert_same_batch(b, a)
    assert a["input_ids"].tolist()[1] == [6, 7, 8, 9, 10, 0, 0, 0]
    template = DataCollatorForCompletionOnlyLM(pad_token_id=0, response_template=(90, 91))
    c = template([{"input_ids": [1, 2, 90, 91, 4, 5]}, {"input_ids": [3, 90, 91, 7]}])
    assert c["labels"].tolist() == [[-100, -100, -100, -100, 4, 5], [-100, -100, -100, 7, -100, -100]]
    with pytest.warns(UserWarning, match="row 0: response template"):
        assert (template([{"input_ids": [1, 2, 3]}])["labels"] == -100).all()
    with pytest.raises(KeyError, match=r"keys present: \['text'\]"):
        collate([{"text": [1]}])


def test_doctests():
    for module in (collators_module, packing_module, tokenizer_info_module):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# ----------------------------------------------------------------------------- the Trainer's default collator


def test_trainer_without_a_collator_pads_with_its_processing_class_as_hf(hf_tokenizer, tmp_path):
    """HF's Trainer falls back to DataCollatorWithPadding(processing_class) when it has a tokenizer; here the
    same (each batch padded to its longest row), or padded to `length_buckets` when they are set."""
    from tiny import tiny_llama

    from jtrain import Trainer, TrainingArguments
    from jtrain.errors import ConfigError, DataError

    rng = np.random.default_rng(0)
    rows = []
    for n in (5, 9, 12, 7, 16, 3, 8, 11):  # ids below the tiny model's vocabulary of 64; [PAD] is 0
        ids = rng.integers(5, 64, size=n).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": ids})

    def trainer(processing_class, **kw):
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                 mesh_shape={"data": 1}, report_to=[], disable_tqdm=True, save_strategy="no",
                                 train_sampling_strategy="sequential", **kw)
        return Trainer(tiny_llama(), args, train_dataset=rows, processing_class=processing_class)

    first = next(iter(trainer(hf_tokenizer).get_train_dataloader()))
    inputs = [{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows[:4]]
    ref = transformers.DataCollatorWithPadding(hf_tokenizer, return_tensors="np")(inputs)
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(first[key][0], ref[key], err_msg=key)  # [accumulation, rows, length]
    assert first["input_ids"].shape == (1, 4, 12)
    assert (first["labels"][0] == -100).sum() == 4 * 12 - (5 + 9 + 12 + 7)  # labels padded with -100
    assert next(iter(trainer(hf_tokenizer, length_buckets=[16, 32]).get_train_dataloader()))["input_ids"].shape == (
        1, 4, 16)
    out = trainer(hf_tokenizer, length_buckets=[16, 32]).train()  # batches of longest 12 and 16: one bucket
    assert np.isfinite(out.training_loss) and out.metrics["train_compilations"] == 1
    with pytest.raises(DataError, match="need padding"):  # no tokenizer: rows are stacked as they are, as in HF
        next(iter(trainer(None).get_train_dataloader()))
    no_pad = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer.backend_tokenizer)
    with pytest.raises(ConfigError, match="no pad token"):
        trainer(no_pad).get_train_dataloader()


def test_transformers_collators_returning_torch_tensors_train_as_their_numpy_form(hf_tokenizer, tmp_path):
    """HF's collators return torch tensors unless told otherwise (`return_tensors="pt"`), and HF users
    pass them as they are: the loader turns them into numpy arrays (JAX cannot read torch dtypes:
    "Cannot interpret 'torch.int64' as a data type"), so the run equals the one with the same
    collator returning numpy, loss for loss (same integers, same programs: exact)."""
    import datasets

    from jtrain import Trainer, TrainingArguments
    from jtrain.models import create_model

    rows = datasets.Dataset.from_list(_features(hf_tokenizer, n=32, seed=3))
    config = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2)
    losses = {}
    for kind in ("pt", "np"):
        args = TrainingArguments(output_dir=str(tmp_path / kind), max_steps=3, per_device_train_batch_size=8,
                                 logging_steps=1, save_strategy="no", disable_tqdm=True, mesh_shape={"data": 1})
        collator = transformers.DataCollatorForLanguageModeling(hf_tokenizer, mlm=False, return_tensors=kind)
        trainer = Trainer(create_model("llama", config), args, data_collator=collator, train_dataset=rows)
        trainer.train()
        losses[kind] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["np"]) == 3 and losses["pt"] == losses["np"]
