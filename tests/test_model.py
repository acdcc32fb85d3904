"""LLMASR: shapes, masks, batching invariance, prompt/label layout, decoding, checkpoints, errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from hdmole.batch import Batch
from hdmole.model import LLMASR, FrameConcatProjector, ModelConfig, PromptBuilder, load_tokenizer
from hdmole.model.decoding import ends_in_repetition
from hdmole.model.encoder import encoder_output_lengths
from hdmole.model.llm import IGNORE_INDEX
from hdmole.model.tiny import SAMPLE_SENTENCES, TinySizes, write_tiny_checkpoints

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny"), SAMPLE_SENTENCES, TinySizes.for_tests(), seed=0)


def make_config(dirs, **overrides) -> ModelConfig:
    base = dict(encoder_dir=str(dirs.whisper_dir), llm_dir=str(dirs.llm_dir), projector_hidden=96)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def model(tiny_dirs):
    torch.manual_seed(0)
    return LLMASR.from_config(make_config(tiny_dirs), device="cpu").eval()


def make_batch(lens: list[int], mels: int = 80, garbage_padding: bool = True, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    t = max(lens)
    feats = torch.randn(len(lens), mels, t, generator=gen)
    valid = torch.arange(t)[None, :] < torch.tensor(lens)[:, None]
    if not garbage_padding:
        feats = feats * valid[:, None, :]
    texts = [SAMPLE_SENTENCES[i % len(SAMPLE_SENTENCES)] for i in range(len(lens))]
    return Batch(ids=[f"utt{i}" for i in range(len(lens))], features=feats, feature_lens=torch.tensor(lens),
                 accents=torch.tensor([i % 9 for i in range(len(lens))]), texts=texts)


def single(batch: Batch, i: int) -> Batch:
    n = int(batch.feature_lens[i])
    return Batch(ids=[batch.ids[i]], features=batch.features[i:i + 1, :, :n], feature_lens=batch.feature_lens[i:i + 1],
                 accents=batch.accents[i:i + 1], texts=[batch.texts[i]])


# ---- shapes and masks ---------------------------------------------------------------------
def test_projector_concatenates_k_frames_and_drops_remainder():
    proj = FrameConcatProjector(encoder_dim=3, llm_dim=4, k=5, hidden=6)
    x = torch.arange(2 * 13 * 3, dtype=torch.float32).reshape(2, 13, 3)
    cat = proj.concat_frames(x)
    assert cat.shape == (2, 2, 15)  # 13 mod 5 = 3 frames dropped
    assert torch.equal(cat[1, 1], x[1, 5:10].reshape(-1))
    y, lens = proj(x, torch.tensor([13, 9]))
    assert y.shape == (2, 2, 4) and lens.tolist() == [2, 1]


def test_encoder_output_lengths_match_stock_conv_arithmetic(model):
    for n in (1, 2, 7, 8, 299, 300):
        out = model.encoder.whisper.conv2(model.encoder.whisper.conv1(torch.zeros(1, 80, n)))
        assert int(encoder_output_lengths(torch.tensor(n))) == out.shape[-1]


def test_variable_length_batch_equals_each_utterance_alone(model):
    batch = make_batch([203, 160, 97, 31])  # odd lengths, garbage in the padding
    enc, lens = model.encoder(batch.features, batch.feature_lens)
    assert enc.shape[1] == 102 and lens.tolist() == [102, 80, 49, 16]
    for i in range(len(batch)):
        alone, alone_len = model.encoder(batch.features[i:i + 1, :, :int(batch.feature_lens[i])], batch.feature_lens[i:i + 1])
        n = int(alone_len)
        assert n == lens[i]
        torch.testing.assert_close(enc[i, :n], alone[0], atol=2e-5, rtol=1e-4)


def test_pad_to_30s_reproduces_stock_whisper_encoder(tiny_dirs):
    cfg = make_config(tiny_dirs, pad_to_30s=True)
    m = LLMASR.from_config(cfg, device="cpu").eval()
    batch = make_batch([250, 120])
    enc, lens = m.encoder(batch.features, batch.feature_lens)
    assert enc.shape[1] == 1500 and lens.tolist() == [1500, 1500]  # SLAM-LLM: all 30 s go on
    # Reference: the stock forward on features padded to 3000 frames with Whisper's silence value.
    from hdmole.model.encoder import _pad_like_whisper
    padded = _pad_like_whisper(batch.features, batch.feature_mask, 3000)
    assert torch.allclose(padded[0, :, 250:], batch.features[0, :, :250].max() - 2.0)
    stock = WhisperEncoder.forward(m.encoder.whisper, padded).last_hidden_state
    torch.testing.assert_close(enc, stock, atol=1e-5, rtol=1e-4)
    m.encoder.keep_padding = False
    assert m.encoder(batch.features, batch.feature_lens)[1].tolist() == [125, 60]


def test_mel_bin_mismatch_is_a_clear_error(model):
    with pytest.raises(ValueError, match="80 mel bins"):
        model.encoder(torch.zeros(1, 128, 50), torch.tensor([50]))
    assert model.num_mel_bins == 80


# ---- prompt and labels --------------------------------------------------------------------
def test_decoding_prompt_is_prefix_of_training_sequence(model):
    prompts = model.prompts
    answers = [prompts.answer_ids(t) for t in SAMPLE_SENTENCES[:3]]
    train = prompts.layout([4, 7, 1], answers)
    decode = prompts.layout([4, 7, 1])
    for i in range(3):
        tr = train.token_ids[i][train.attention_mask[i] == 1]
        de = decode.token_ids[i][decode.attention_mask[i] == 1]
        assert torch.equal(tr[: len(de)], de)
        assert torch.equal(train.speech_mask[i][train.attention_mask[i] == 1][: len(de)],
                           decode.speech_mask[i][decode.attention_mask[i] == 1])
        labels = train.labels[i][train.attention_mask[i] == 1]
        assert (labels[: len(de)] == IGNORE_INDEX).all()
        assert labels[len(de):].tolist() == answers[i] and answers[i][-1] == prompts.eos_id
        assert prompts.decode(answers[i]) == SAMPLE_SENTENCES[i]
    # left padding: positions restart at 0 on each row's first real token
    assert train.position_ids[2][train.attention_mask[2] == 1].tolist() == list(range(int(train.attention_mask[2].sum())))


def test_chat_template_wraps_instruction(model):
    text = model.prompts.tokenizer.decode(model.prompts.prefix_ids + model.prompts.suffix_ids)
    assert text == "<|im_start|>user\n请转写音频为文字<|im_end|>\n<|im_start|>assistant\n"


def test_asr_loss_equals_hf_causal_lm_loss(model):
    batch = make_batch([120, 64, 90])
    out = model(batch)
    # Reference: the LLM's own shifted cross-entropy over the full-vocabulary logits.
    enc, enc_lens = model.encode(batch)
    speech, n = model.project(enc, enc_lens, batch)
    layout = model.prompts.layout(n.tolist(), [model.prompts.answer_ids(t) for t in batch.texts])
    ref = model.llm(inputs_embeds=model._embed(layout, speech, n), attention_mask=layout.attention_mask,
                    position_ids=layout.position_ids, labels=layout.labels).loss
    torch.testing.assert_close(out.asr_loss, ref, atol=1e-5, rtol=1e-5)
    assert out.num_answer_tokens == sum(len(t) + 1 for t in batch.texts)
    assert out.ctc_loss is None and out.aux_losses == {}
    torch.testing.assert_close(model(batch, encoded=(enc, enc_lens)).loss, out.loss)  # cached encoder output


def test_gradients_reach_only_trainable_parts(tiny_dirs):
    m = LLMASR.from_config(make_config(tiny_dirs, ctc_weight=0.3), device="cpu").train()
    out = m(make_batch([80, 60]))
    assert out.ctc_loss is not None and torch.isfinite(out.ctc_loss)
    torch.testing.assert_close(out.loss, out.asr_loss + 0.3 * out.ctc_loss)
    out.loss.backward()
    assert m.projector.linear1.weight.grad is not None and m.ctc_head.weight.grad is not None
    assert all(p.grad is None for p in m.llm.parameters()) and all(p.grad is None for p in m.encoder.parameters())
    assert not m.encoder.training and not m.llm.training  # frozen parts stay in eval mode


def test_asr_weight_zero_trains_encoder_with_ctc_only(tiny_dirs):
    m = LLMASR.from_config(make_config(tiny_dirs, ctc_weight=1.0, asr_weight=0.0, freeze_encoder=False), device="cpu").train()
    out = m(make_batch([80, 60]))
    assert out.asr_loss is None
    out.loss.backward()
    assert m.encoder.whisper.layers[0].fc1.weight.grad is not None
    assert m.encoder.whisper.embed_positions.weight.grad is None
    assert set(m.ctc_transcribe(make_batch([80, 60]))) == {"utt0", "utt1"}



def _sdpa_zero_forward_nan_backward(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                    enable_gqa=False, **_):
    """SDPA as CUDA's memory-efficient kernel treats a query row with no key: 0 in the forward,
    NaN in the backward (the softmax of an all -inf row is NaN; zeroing it afterwards hides it
    from the forward only). Exact elsewhere."""
    if enable_gqa:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scores = query @ key.transpose(-1, -2) * (scale if scale is not None else query.shape[-1] ** -0.5)
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device)
    if is_causal:
        allowed = allowed.tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    elif attn_mask is not None:  # additive (finite minimum: no row is empty)
        scores = scores + attn_mask
    bias = torch.zeros_like(allowed, dtype=scores.dtype).masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores + bias, dim=-1)  # additive bias as the kernel: no gradient masking
    weights = torch.where(allowed.any(-1, keepdim=True), weights, 0.0)
    return weights @ value


def test_left_padded_training_gives_finite_gradients_with_keyless_rows_nan_kernel(tiny_dirs, monkeypatch):
    # H200 stage 2b: "non-finite gradient ... llm.model.embed_tokens.weight" with a finite loss.
    # Left-pad query rows had no key under the stock causal & padding mask.
    batch = make_batch([230, 96, 150, 57], seed=3)
    grads = {}
    for kernel in ("torch", "nan_prone"):
        torch.manual_seed(0)
        m = LLMASR.from_config(make_config(tiny_dirs, freeze_encoder=True, freeze_llm=False), "cpu").train()
        with monkeypatch.context() as patch:
            if kernel == "nan_prone":
                patch.setattr(torch.nn.functional, "scaled_dot_product_attention", _sdpa_zero_forward_nan_backward)
            out = m(batch)
            out.loss.backward()
        grads[kernel] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        assert "llm.model.embed_tokens.weight" in grads[kernel] and "projector.linear1.weight" in grads[kernel]
        bad = [n for n, g in grads[kernel].items() if not torch.isfinite(g).all()]
        assert not bad, f"{kernel}: non-finite gradients in {bad[:3]}"
    for name, g in grads["torch"].items():
        torch.testing.assert_close(grads["nan_prone"][name], g, atol=1e-5, rtol=1e-4)


def test_training_mask_lets_only_pad_queries_attend_to_themselves(model, monkeypatch):
    from hdmole.model import asr, llm

    layout = model.prompts.layout([3, 1, 5], [model.prompts.answer_ids(t) for t in SAMPLE_SENTENCES[:3]])
    real = layout.attention_mask.bool()
    mask = llm.training_attention_mask(model.llm, layout.attention_mask, model.device)["full_attention"][:, 0]
    assert mask.any(-1).all()  # every query row has a key
    length = real.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    stock = causal[None] & real[:, None, :]
    assert torch.equal(mask[real], stock[real])  # real queries: causal over real keys, as before
    assert torch.equal(mask[~real], torch.eye(length, dtype=torch.bool)[None].expand_as(mask)[~real])
    unpadded = layout.attention_mask[:1, -5:]
    assert llm.training_attention_mask(model.llm, unpadded, model.device) is not None
    assert torch.is_tensor(llm.training_attention_mask(model.llm, unpadded, model.device))  # no padding: stock path
    # Same loss as the stock 2D mask (transformers' own causal & padding mask).
    batch = make_batch([120, 64, 90])
    fixed = model(batch).loss
    monkeypatch.setattr(asr, "training_attention_mask", lambda llm_, mask_, device: mask_.to(device))
    torch.testing.assert_close(model(batch).loss, fixed, atol=1e-6, rtol=1e-6)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_left_padded_training_gradients_finite_with_cuda_memory_efficient_sdpa(tiny_dirs, dtype, monkeypatch):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hdmole.model import asr

    m = LLMASR.from_config(make_config(tiny_dirs, dtype=dtype, freeze_encoder=True, freeze_llm=False), "cuda").train()
    gen = torch.Generator().manual_seed(0)

    def nonfinite_batches() -> int:
        count = 0
        for seed in range(24):  # batch sizes and padded lengths vary (the H200 failure was shape dependent)
            lens = torch.randint(40, 400, (int(torch.randint(2, 40, (1,), generator=gen)),), generator=gen).tolist()
            m.zero_grad(set_to_none=True)
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                out = m(make_batch(lens, seed=seed))
                out.loss.backward()
            assert torch.isfinite(out.loss)
            count += not all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        return count

    assert nonfinite_batches() == 0
    with monkeypatch.context() as patch:  # the stock 2D mask, for the record (-s shows it)
        patch.setattr(asr, "training_attention_mask", lambda llm, mask, device: mask.to(device))
        print(f"{dtype}: stock mask gave non-finite gradients in {nonfinite_batches()} of 24 batches")


# ---- decoding -----------------------------------------------------------------------------
def test_batched_greedy_equals_batch_of_one(model):
    batch = make_batch([230, 96, 150, 57], seed=3)
    together = model.transcribe(batch, max_new_tokens=12, max_repeats=0)
    assert list(together) == batch.ids
    for i in range(len(batch)):
        assert model.transcribe(single(batch, i), max_new_tokens=12, max_repeats=0) == {batch.ids[i]: together[batch.ids[i]]}


def test_batched_beam_equals_batch_of_one_and_beam1_is_greedy(model):
    batch = make_batch([180, 70, 120], seed=5)
    beams = model.transcribe(batch, num_beams=3, max_new_tokens=8)
    for i in range(len(batch)):
        assert model.transcribe(single(batch, i), num_beams=3, max_new_tokens=8) == {batch.ids[i]: beams[batch.ids[i]]}
    from hdmole.model.decoding import LMStepper, StoppingRules, beam_search, greedy_search
    layout = model.prompts.layout([3, 5])
    embeds = model.llm.get_input_embeddings()(layout.token_ids)
    rules = StoppingRules(model.prompts.eos_id, model.prompts.pad_id, torch.tensor([9, 6]), max_repeats=0)
    args = (LMStepper(model.llm), embeds, layout.attention_mask, layout.position_ids, rules)
    assert beam_search(*args, num_beams=1) == greedy_search(*args)


def test_greedy_matches_uncached_argmax_reference(model):
    layout = model.prompts.layout([4])
    embeds = model.llm.get_input_embeddings()(layout.token_ids)
    from hdmole.model.decoding import LMStepper, StoppingRules, greedy_search
    rules = StoppingRules(model.prompts.eos_id, model.prompts.pad_id, torch.tensor([6]), max_repeats=0)
    got = greedy_search(LMStepper(model.llm), embeds, layout.attention_mask, layout.position_ids, rules)[0]
    ref: list[int] = []
    for _ in range(6):  # recompute the whole sequence each step, no cache
        e = torch.cat([embeds, model.llm.get_input_embeddings()(torch.tensor([ref], dtype=torch.long))], dim=1)
        nxt = int(model.llm(inputs_embeds=e).logits[0, -1].argmax())
        if nxt == model.prompts.eos_id:
            break
        ref.append(nxt)
    assert got == ref


def test_new_tokens_bounded_by_audio_length(model):
    bound = model.max_new_tokens_for(torch.tensor([100, 1000, 5000]), max_new_tokens=40, max_tokens_per_second=10.0)
    assert bound.tolist() == [14, 40, 40]
    batch = make_batch([100, 60], seed=7)
    for utt, text in model.transcribe(batch, max_tokens_per_second=3.0, max_repeats=0).items():
        assert len(model.prompts.encode(text)) <= (7 if utt == "utt0" else 6)


def test_repetition_guard():
    rows = torch.tensor([[5, 1, 2, 1, 2, 1, 2],   # "12" x3
                         [1, 2, 3, 4, 5, 6, 7],
                         [9, 9, 9, 9, 9, 9, 9]])
    assert ends_in_repetition(rows, max_ngram=2, repeats=3).tolist() == [True, False, True]
    assert ends_in_repetition(rows, max_ngram=1, repeats=3).tolist() == [False, False, True]
    assert ends_in_repetition(rows[:, :2], max_ngram=2, repeats=3).tolist() == [False, False, False]


# ---- checkpoints --------------------------------------------------------------------------
def test_save_load_trainable_roundtrip(tiny_dirs, tmp_path):
    torch.manual_seed(1)
    m = LLMASR.from_config(make_config(tiny_dirs, ctc_weight=0.2), device="cpu")
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    m.train()
    m(make_batch([90, 70])).loss.backward()
    opt.step()
    m.eval()
    batch = make_batch([110, 75], seed=9)
    ref_loss, ref_hyp = m(batch).loss, m.transcribe(batch, max_new_tokens=6)
    m.save_trainable(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "model_config.json").read_text())
    assert meta["model"]["ctc_weight"] == 0.2
    torch.manual_seed(2)  # a different random projector before loading
    fresh = LLMASR.from_saved(tmp_path / "ckpt", device="cpu").eval()
    assert not torch.equal(fresh.projector.linear1.weight, LLMASR.from_config(make_config(tiny_dirs, ctc_weight=0.2), "cpu").projector.linear1.weight)
    torch.testing.assert_close(fresh(batch).loss, ref_loss, atol=0, rtol=0)
    assert fresh.transcribe(batch, max_new_tokens=6) == ref_hyp
    other = LLMASR.from_config(make_config(tiny_dirs), device="cpu")  # no CTC head: mismatch
    with pytest.raises(ValueError, match="ctc_head"):
        other.load_trainable(tmp_path / "ckpt")


# ---- loading ------------------------------------------------------------------------------
def test_tiny_dirs_load_offline_and_full_whisper_checkpoint_equals_encoder_only(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    full = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(tiny_dirs.whisper_dir))
    enc_only = WhisperEncoder.from_pretrained(tiny_dirs.whisper_dir)
    full.model.encoder.load_state_dict(enc_only.state_dict())
    full.save_pretrained(tmp_path / "full", max_shard_size="200KB")  # sharded, as real checkpoints
    assert (tmp_path / "full" / "model.safetensors.index.json").is_file()
    from hdmole.model.encoder import load_whisper_encoder
    loaded = load_whisper_encoder(tmp_path / "full", torch.float32)
    for name, tensor in enc_only.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    tok = load_tokenizer(tiny_dirs.llm_dir)
    for s in SAMPLE_SENTENCES:
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
    assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")


def test_bad_model_directories_are_clear_errors(tiny_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLMASR.from_config(make_config(tiny_dirs, encoder_dir=str(tmp_path / "nope")), device="cpu")
    with pytest.raises(ValueError, match="expected a Whisper checkpoint"):
        LLMASR.from_config(make_config(tiny_dirs, encoder_dir=str(tiny_dirs.llm_dir)), device="cpu")
    with pytest.raises(ValueError, match="Qwen2 family"):
        LLMASR.from_config(make_config(tiny_dirs, llm_dir=str(tiny_dirs.whisper_dir)), device="cpu")
    no_template = tmp_path / "qwen_no_template"
    shutil.copytree(tiny_dirs.llm_dir, no_template)
    (no_template / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(no_template)
    with pytest.raises(ValueError, match="not in the tokenizer"):
        PromptBuilder(load_tokenizer(tiny_dirs.llm_dir), "x", "<|no_such_token|>")


# ---- adapters -----------------------------------------------------------------------------
def test_attached_adapter_starts_as_base_adds_aux_losses_and_roundtrips(tiny_dirs, tmp_path):
    from hdmole.adapters import AdapterConfig

    torch.manual_seed(3)
    m = LLMASR.from_config(make_config(tiny_dirs), device="cpu")
    batch = make_batch([120, 80, 64], seed=11)
    base_loss = m.eval()(batch).asr_loss
    handle = m.attach_adapter(AdapterConfig(method="mole", rank=2, lambda_accent=0.1), num_accents=9)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("projector.", "adapter.")) for n in trainable)
    assert not m.projector.linear1.base.weight.requires_grad  # the adapter library's wrapper keeps the base
    out = m(batch)
    torch.testing.assert_close(out.asr_loss, base_loss)  # B = 0: a fresh adapter changes nothing
    assert set(out.aux_losses) == {"accent_ce", "load_balance"}
    torch.testing.assert_close(out.loss, out.asr_loss + out.aux_losses["accent_ce"] + out.aux_losses["load_balance"])
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
    m(batch).loss.backward()
    opt.step()
    m.eval()
    ref_loss, ref_hyp = m(batch).loss, m.transcribe(batch, max_new_tokens=6)
    assert not torch.equal(ref_loss, base_loss)
    assert handle.statistics_summary()["layers"]
    m.save_trainable(tmp_path / "mole")
    fresh = LLMASR.from_saved(tmp_path / "mole", device="cpu").eval()
    torch.testing.assert_close(fresh(batch).loss, ref_loss, atol=0, rtol=0)
    assert fresh.transcribe(batch, max_new_tokens=6) == ref_hyp


def test_stage_transition_loads_encoder_checkpoint_non_strictly(tiny_dirs, tmp_path):
    stage1 = LLMASR.from_config(make_config(tiny_dirs, ctc_weight=1.0, asr_weight=0.0, freeze_encoder=False), "cpu")
    with torch.no_grad():
        stage1.encoder.whisper.layers[0].fc1.weight.add_(1.0)
    stage1.save_trainable(tmp_path / "stage1")
    stage2 = LLMASR.from_config(make_config(tiny_dirs, ctc_weight=1.0), "cpu")  # encoder frozen now
    with pytest.raises(ValueError, match="unexpected"):
        stage2.load_trainable(tmp_path / "stage1")
    stage2.load_trainable(tmp_path / "stage1", strict=False)
    assert torch.equal(stage2.encoder.whisper.layers[0].fc1.weight, stage1.encoder.whisper.layers[0].fc1.weight)
    assert not stage2.encoder.whisper.layers[0].fc1.weight.requires_grad


def test_static_stepper_matches_dynamic_stepper(model):
    from hdmole.model.decoding import LMStepper, StaticLMStepper
    layout = model.prompts.layout([3, 6, 1])
    embeds = model.llm.get_input_embeddings()(layout.token_ids)
    dynamic, static = LMStepper(model.llm), StaticLMStepper(model.llm, max_new_tokens=8)
    args = (embeds, layout.attention_mask, layout.position_ids)
    a, b = dynamic.prefill(*args), static.prefill(*args)
    torch.testing.assert_close(a, b)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        tokens = torch.randint(0, 100, (3,), generator=gen)
        if step == 3:  # beam reordering keeps both caches in step
            rows = torch.tensor([2, 0, 0])
            dynamic.reorder(rows)
            static.reorder(rows)
        torch.testing.assert_close(dynamic.step(tokens), static.step(tokens), atol=1e-5, rtol=1e-4)
    batch = make_batch([150, 90], seed=13)
    reference = model.transcribe(batch, max_new_tokens=10, decode_backend="dynamic")
    assert model.transcribe(batch, max_new_tokens=10, decode_backend="static") == reference
    assert model.transcribe(batch, num_beams=2, max_new_tokens=6, decode_backend="static") == \
        model.transcribe(batch, num_beams=2, max_new_tokens=6, decode_backend="dynamic")


@pytest.mark.parametrize("broken", ["_step_body", "_allocate"])
def test_static_stepper_falls_back_to_generic_decoding(model, monkeypatch, broken, caplog):
    from hdmole.model.decoding import StaticLMStepper

    batch = make_batch([150, 90], seed=13)
    greedy = model.transcribe(batch, max_new_tokens=10, decode_backend="dynamic")
    beam = model.transcribe(batch, num_beams=2, max_new_tokens=6, decode_backend="dynamic")

    def fail(*args, **kwargs):
        raise RuntimeError("simulated")

    monkeypatch.setattr(StaticLMStepper, broken, fail)
    assert model.transcribe(batch, max_new_tokens=10, decode_backend="static") == greedy
    assert model.transcribe(batch, num_beams=2, max_new_tokens=6, decode_backend="static") == beam
    assert "simulated" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decoding_equals_generic_decoding_on_gpu(tiny_dirs):
    batch = make_batch([230, 96, 150, 57], seed=3)
    m = LLMASR.from_config(make_config(tiny_dirs, dtype="float32"), device="cuda").eval()
    from hdmole.model.decoding import StaticLMStepper
    stepper = StaticLMStepper(m.llm, max_new_tokens=4)
    layout = m.prompts.layout([3, 5])
    with torch.no_grad():
        stepper.prefill(m.llm.get_input_embeddings()(layout.token_ids.cuda()), layout.attention_mask.cuda(),
                        layout.position_ids.cuda())
        stepper.step(torch.tensor([1, 2], device="cuda"))
    assert stepper.path == "cuda_graph"  # no silent fallback on the GPU
    fast = m.transcribe(batch, max_new_tokens=12, max_repeats=0, decode_backend="static")
    assert fast == m.transcribe(batch, max_new_tokens=12, max_repeats=0, decode_backend="dynamic")
    assert m.transcribe(batch, num_beams=3, max_new_tokens=8, decode_backend="static") == \
        m.transcribe(batch, num_beams=3, max_new_tokens=8, decode_backend="dynamic")
    half = LLMASR.from_config(make_config(tiny_dirs), device="cuda")
    assert half.compute_dtype == torch.bfloat16 and half.llm.dtype == torch.bfloat16
    assert half.projector.linear1.weight.dtype == torch.float32  # trainable parts stay fp32
    assert set(half.transcribe(batch, max_new_tokens=8)) == set(batch.ids)
    out = half.train()(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and half.projector.linear1.weight.grad is not None


# ---- encoder pre-training helpers (tiny base model, docs/base_model.md) -------------------
def test_pinyin_ctc_units_roundtrip_and_head(tiny_dirs):
    from hdmole.model.ctc_units import PinyinUnits

    units = PinyinUnits()
    assert 60 <= units.size <= 70 and units.units[units.blank] == "<blank>"
    ids = units.encode("我们去学校吧。OK")
    assert units.decode(ids) == "uo3 men5 qv4 xve2 xiao4 ba5"  # phonetic spelling, punctuation skipped
    assert [units.units[i] for i in ids[:3]] == ["uo", "3", "m"]  # zero initial: no initial unit
    torch.manual_seed(0)  # a random head: its greedy output must not depend on earlier tests
    m = LLMASR.from_config(make_config(tiny_dirs, ctc_weight=1.0, asr_weight=0.0, ctc_units="pinyin",
                                       freeze_encoder=False), "cpu").train()
    assert m.ctc_head.out_features == units.size
    batch = make_batch([120, 90])
    out = m(batch)
    assert torch.isfinite(out.ctc_loss) and out.ctc_loss > 0
    hyps = m.ctc_transcribe(batch)
    assert all(h == "" or h.split()[0][-1].isdigit() for h in hyps.values())
    assert m.ctc_reference("你好") == "ni3 hao3"
    with pytest.raises(ValueError, match="ctc_units"):
        LLMASR.from_config(make_config(tiny_dirs, ctc_units="phones"), "cpu")


def test_spec_augment_masks_valid_frames_only_and_only_in_training(tiny_dirs):
    from hdmole.model.specaug import spec_augment

    cfg = make_config(tiny_dirs, specaug_freq_masks=2, specaug_freq_width=10, specaug_time_masks=2, specaug_time_width=30)
    batch = make_batch([200, 120])
    feats = batch.features.clone()
    out = spec_augment(feats, batch.feature_lens, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(feats, batch.features)  # not in place
    changed = out != feats
    assert changed.any()
    assert not changed[1, :, 120:].any()  # padding untouched
    for i, n in enumerate((200, 120)):
        mean = feats[i, :, :n].mean()
        torch.testing.assert_close(out[i][changed[i]], mean.expand(int(changed[i].sum())))
        time_masked = changed[i].all(dim=0).sum()
        assert time_masked <= 2 * int(0.2 * n)
    m = LLMASR.from_config(cfg, "cpu").eval()
    assert torch.equal(m.encode(batch)[0], m.encode(batch)[0])  # no augmentation at inference


class MarkovStepper:
    """A stand-in LM whose next-token logits depend on the step and the last token only."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # (steps + 1, V, V)

    def prefill(self, embeds, attention_mask, position_ids):
        self.t = 0
        self.last = torch.zeros(embeds.shape[0], dtype=torch.long)
        return self.table[0, self.last]

    def step(self, tokens):
        self.t += 1
        self.last = tokens.clamp(max=self.table.shape[-1] - 1)  # dead beams carry the pad id
        return self.table[self.t, self.last]

    def reorder(self, rows):
        self.last = self.last[rows]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_is_exact_when_beams_cover_all_hypotheses(length_penalty):
    import itertools

    from hdmole.model.decoding import StoppingRules, beam_search, greedy_search

    vocab, eos, max_new = 4, 3, 3
    table = torch.randn(max_new + 2, vocab, vocab, generator=torch.Generator().manual_seed(4)) * 2
    logp = torch.log_softmax(table, dim=-1)
    best, best_score = None, float("-inf")
    for n in range(max_new + 1):  # n answer tokens, then EOS (forced, log p = 0, at step max_new)
        for seq in itertools.product(range(eos), repeat=n):
            last, score = 0, 0.0
            for t, tok in enumerate(seq):
                score += float(logp[t, last, tok])
                last = tok
            score += float(logp[n, last, eos]) if n < max_new else 0.0
            score /= (n + 1) ** length_penalty
            if score > best_score:
                best, best_score = list(seq), score
    rules = StoppingRules(eos_id=eos, pad_id=99, max_new_tokens=torch.tensor([max_new]), max_repeats=0)
    dummy = (torch.zeros(1, 2, 8), torch.ones(1, 2, dtype=torch.long), torch.arange(2)[None])
    assert beam_search(MarkovStepper(table), *dummy, rules, num_beams=27, length_penalty=length_penalty) == [best]
    greedy = greedy_search(MarkovStepper(table), *dummy, rules)[0]
    assert len(greedy) <= max_new


def test_text_pretraining_teaches_the_tiny_llm_the_corpus():
    from hdmole.model.tiny import build_char_tokenizer, pretrain_text_lm, qwen_config

    torch.manual_seed(0)
    tokenizer = build_char_tokenizer(SAMPLE_SENTENCES)
    from transformers import Qwen2ForCausalLM
    llm = Qwen2ForCausalLM(qwen_config(TinySizes.for_tests(), tokenizer))
    prompts = PromptBuilder(tokenizer, "请转写音频为文字", "<|im_end|>")
    losses = pretrain_text_lm(llm, prompts, SAMPLE_SENTENCES, steps=40, batch_size=5, lr=1e-2)
    assert losses[-1] < 0.3 * losses[0]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_dirs):
    batch = make_batch([120, 70])
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        m = LLMASR.from_config(make_config(tiny_dirs, freeze_encoder=False, freeze_llm=False,
                                           gradient_checkpointing=checkpointing), "cpu").train()
        assert m.llm.training and m.encoder.training
        assert m.llm.model.layers[0].gradient_checkpointing == checkpointing
        assert m.encoder.whisper.layers[0].gradient_checkpointing == checkpointing
        calls = []
        for module in (m.encoder.whisper.layers[0].fc1, m.llm.model.layers[0].mlp.gate_proj):
            module.register_forward_hook(lambda *_: calls.append(1))
        out = m(batch)
        out.loss.backward()
        assert len(calls) == (4 if checkpointing else 2)  # checkpointed layers recompute in backward
        results.append((out.loss.detach(), m.encoder.whisper.layers[0].fc1.weight.grad.clone(),
                        m.llm.model.layers[0].mlp.up_proj.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_encoder_output_cache_equals_encoding_and_round_trips(tiny_dirs, tmp_path):
    from hdmole.model.encoder_cache import EncoderOutputCache, encoder_fingerprint

    torch.manual_seed(0)
    m = LLMASR.from_config(make_config(tiny_dirs), device="cpu")
    batches = [make_batch([40, 33, 27], seed=1), make_batch([38, 20], seed=2)]
    for i, b in enumerate(batches):
        b.ids = [f"b{i}_{u}" for u in b.ids]
    cut_set = tmp_path / "kespeech_train.jsonl.gz"
    cut_set.write_bytes(b"stand-in cut set")
    key = encoder_fingerprint(m.encoder, "settings")
    filled = EncoderOutputCache(tmp_path / "cache", key)
    filled.fill(cut_set, batches, m.encode)
    loaded = EncoderOutputCache(tmp_path / "cache", key)
    loaded.fill(cut_set, [], lambda b: pytest.fail("a stored cut set must not be encoded again"))
    m.eval()
    for cache in (filled, loaded):
        m.encoder_cache = None
        # a different batch composition than the fill: outputs are per utterance
        mixed = make_batch([40, 38], seed=3)
        mixed.ids, mixed.features, mixed.feature_lens = ["b0_utt0", "b1_utt0"], None, None
        want = [m.encode(single(batches[0], 0)), m.encode(single(batches[1], 0))]
        m.use_encoder_cache(cache)
        enc, lens = m.encode(mixed)  # no features needed: every id is cached
        assert lens.tolist() == [int(w[1]) for w in want]
        for i, (w, n) in enumerate(want):
            assert torch.allclose(enc[i, : int(n)], w[0, : int(n)], atol=1e-5)
            assert not enc[i, int(n):].any()  # padding is zero
    fresh = make_batch([30], seed=4)  # an id the cache lacks: encoded as usual
    with torch.no_grad():
        assert torch.equal(m.encode(fresh)[0], m.encoder(fresh.features, fresh.feature_lens)[0])
    assert m.encoder_cache.misses == 1
    assert encoder_fingerprint(m.encoder, "other settings") != key
    with pytest.raises(ValueError, match="freeze_encoder=true and no SpecAugment"):
        LLMASR.from_config(make_config(tiny_dirs, specaug_time_masks=2), device="cpu").use_encoder_cache(loaded)
