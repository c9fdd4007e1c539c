"""Cohere / Cohere2 import and export against transformers itself, on tiny random models built
in-process (tests/hf_models.py): exact logits both ways, bitwise round trips, cached decoding,
greedy generation token for token, dtypes, LoRA folding, and every refusal by name."""

import json

import pytest
import torch
from bpe import tokenizer_files
from conftest import assert_close_f32, float32_bound
from hf_models import VARIANTS, left_padded_positions, save_hf_dir, tiny_hf_model, transformers
from safetensors.torch import load_file

from palm_rlhf import ByteTokenizer, LoRAConfig, PaLM, PaLMConfig, generate
from palm_rlhf.cli import main
from palm_rlhf.hf import HFTokenizer, byte_tokenizer_files, export_hf, import_hf
from palm_rlhf.hf.weights import rotary_permutation


def convert(tmp_path, name, **extra):
    """(the transformers model, our import of it, the HF directory)."""
    variant = {**VARIANTS[name], **extra}
    kind = variant.pop("kind")
    hf = tiny_hf_model(kind, **variant)
    hf_dir = save_hf_dir(hf, tmp_path / "hf")
    import_hf(hf_dir, tmp_path / "ours", show_progress=False)
    return hf, PaLM.from_pretrained(tmp_path / "ours"), hf_dir


def all_tensors(directory):
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def max_diff(a, b):
    """Largest |difference|; compared with float32_bound (tests/conftest.py): the converted
    model sums its products in another order than transformers' (fused projections, a folded
    adapter), so logits agree to a few dozen roundings of their size, not bit for bit."""
    return (a - b).abs().max().item()


def close(a, b) -> bool:
    return max_diff(a, b) <= float32_bound(a, b)


# ----------------------------------------------------------------------------- exact logits


@pytest.mark.parametrize("name", VARIANTS)
def test_imported_logits_equal_transformers(tmp_path, name):
    hf, ours, _ = convert(tmp_path, name)
    torch.manual_seed(1)
    # 40 tokens: past the Cohere2 variant's window of 6, so sliding layers really slide.
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        expected, got = hf(tokens).logits, ours(tokens)
    assert close(expected, got)
    assert expected.abs().max() > 1.0  # logits that differ clearly, not a near-uniform model

    # A left-padded batch, with the attention mask and position ids generate would give.
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, :13] = False
    padded = tokens.masked_fill(~mask, 0)
    with torch.no_grad():
        expected = hf(padded, attention_mask=mask.long(), position_ids=left_padded_positions(mask))
        got = ours(padded, mask=mask)
    assert close(expected.logits[mask], got[mask])


def test_variants_are_what_they_claim(tmp_path):
    configs = {}
    for name in VARIANTS:
        _, ours, _ = convert(tmp_path / name, name)
        configs[name] = ours.config
    assert configs["cohere"].qk_layernorm is False and configs["cohere"].layer_types == ()
    assert configs["cohere_qk_norm"].qk_layernorm is True
    sliding = configs["cohere2_sliding"]
    assert sliding.layer_types == ("sliding", "sliding", "sliding", "full")
    assert sliding.rotary_layers == (True, True, True, False) and sliding.sliding_window == 6
    assert 1 < configs["gqa"].kv_heads < configs["gqa"].heads
    assert configs["ff_ratio"].ff_inner_dim == 50 and 50 % configs["ff_ratio"].dim != 0
    assert configs["logit_scale"].logit_scale == 0.25


@pytest.mark.parametrize("name", ["cohere_qk_norm", "cohere2_sliding"])
def test_round_trip_import_export_is_bitwise(tmp_path, name):
    hf, _, hf_dir = convert(tmp_path, name)
    export_hf(tmp_path / "ours", tmp_path / "back", max_shard_bytes=20_000, show_progress=False)
    original, exported = all_tensors(hf_dir), all_tensors(tmp_path / "back")
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "back").glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    before = json.loads((hf_dir / "config.json").read_text())
    after = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("model_type", "hidden_size", "intermediate_size", "num_key_value_heads"):
        assert after[key] == before[key], key
    for name_ in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "back" / name_).read_text() == (hf_dir / name_).read_text()
    reloaded = type(hf).from_pretrained(tmp_path / "back").eval()
    tokens = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)


def test_permutation_maps_interleaved_pairs_to_halves():
    # Cohere pairs channels (0,1), (2,3), (4,5); ours pairs (j, j + 3) after the reordering.
    assert rotary_permutation(6).tolist() == [0, 2, 4, 1, 3, 5]


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", ["cohere_qk_norm", "cohere2_sliding"])
def test_cached_decoding_of_an_imported_model_equals_its_full_forward(tmp_path, name):
    _, ours, _ = convert(tmp_path, name)
    tokens = torch.randint(0, 300, (2, 30))
    cache = ours.new_cache(2)
    with torch.no_grad():
        ours(tokens[:, :4], cache=cache)
        for step in range(4, 30):  # past the window of 6 from step 6 on
            cached = ours(tokens[:, step : step + 1], cache=cache)[:, -1]
            full = ours(tokens[:, : step + 1])[:, -1]
            assert_close_f32(cached, full)


@pytest.mark.parametrize("name", ["cohere", "cohere2_sliding", "gqa"])
def test_greedy_generation_matches_transformers_generate(tmp_path, name):
    hf, ours, _ = convert(tmp_path, name)
    prompts = [[2, 17, 99, 4, 250], [2, 31, 7]]
    out = generate(ours, prompts, max_new_tokens=32, temperature=0.0, pad_id=0)
    hf_out = hf.generate(
        out.prompt_tokens,
        attention_mask=out.prompt_mask.long(),
        max_new_tokens=32,
        min_new_tokens=32,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )[:, out.prompt_tokens.shape[1] :]
    assert hf_out.shape == out.tokens.shape == (2, 32)
    for row in range(2):
        agree = (hf_out[row] == out.tokens[row]).tolist()
        if all(agree):
            continue
        # A flipped near-tie: show the gap is below 1e-4 there, then compare the rest with
        # transformers' tokens fed to both (teacher forcing).
        step = agree.index(False)
        sequence = torch.cat((torch.tensor(prompts[row]), hf_out[row]))[None]
        with torch.no_grad():
            ours_logits = ours(sequence)[0, len(prompts[row]) - 1 :][:-1]
            hf_logits = hf(sequence).logits[0, len(prompts[row]) - 1 :][:-1]
        top2 = ours_logits[step].topk(2).values
        assert (top2[0] - top2[1]).item() < 1e-4, f"row {row} diverged at step {step}"
        assert close(ours_logits, hf_logits)


# ----------------------------------------------------------------------------- dtypes


def test_bf16_stays_bf16_and_float32_upcasts(tmp_path):
    hf = tiny_hf_model("cohere2", sliding_window=6).to(torch.bfloat16)
    hf_dir = save_hf_dir(hf, tmp_path / "hf")
    import_hf(hf_dir, tmp_path / "bf16", show_progress=False)
    assert {t.dtype for t in all_tensors(tmp_path / "bf16").values()} == {torch.bfloat16}
    assert {p.dtype for p in PaLM.from_pretrained(tmp_path / "bf16").parameters()} == {
        torch.bfloat16
    }
    assert (
        main(["import-hf", str(hf_dir), "--out", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    )
    upcast = PaLM.from_pretrained(tmp_path / "f32")
    assert {p.dtype for p in upcast.parameters()} == {torch.float32}
    # transformers' own float32 load of the bf16 files (hf.float() would keep the rotary
    # frequencies that .to(bfloat16) rounded).
    reference = type(hf).from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert close(reference(tokens).logits, upcast(tokens))
    # Exported back in bf16, the weights are the original bits (bf16 -> f32 -> bf16 is exact).
    args = ["export-hf", str(tmp_path / "f32"), "--out", str(tmp_path / "back")]
    assert main([*args, "--dtype", "bfloat16", "--max-shard-size", "30KB"]) == 0
    original, back = all_tensors(hf_dir), all_tensors(tmp_path / "back")
    assert all(
        torch.equal(back[k], v) and back[k].dtype == torch.bfloat16 for k, v in original.items()
    )


# ----------------------------------------------------------------------------- LoRA


def test_export_folds_the_adapter_in(tmp_path):
    hf, ours, _ = convert(tmp_path, "cohere2_sliding")
    ours.add_lora("actor", LoRAConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if ".adapters." in name:
                param.normal_(0, 0.2)
    ours.save_pretrained(tmp_path / "policy")
    export_hf(tmp_path / "policy", tmp_path / "back", show_progress=False)
    reloaded = type(hf).from_pretrained(tmp_path / "back").eval()
    tokens = torch.randint(0, 300, (2, 25))
    with torch.no_grad():
        adapted, base = ours(tokens, lora_scope="actor"), ours(tokens)
        exported = reloaded(tokens).logits
    assert max_diff(adapted, base) > 0.1  # the adapter matters ...
    assert close(exported, adapted)  # ... and is in the exported weights


def test_several_scopes_need_a_choice(tmp_path):
    _, ours, _ = convert(tmp_path, "cohere")
    ours.add_lora("actor", LoRAConfig(rank=2))
    ours.add_lora("critic", LoRAConfig(rank=2))
    ours.save_pretrained(tmp_path / "policy")
    with pytest.raises(ValueError, match=r"scopes \['actor', 'critic'\]: name the one"):
        export_hf(tmp_path / "policy", tmp_path / "back", show_progress=False)
    assert not (tmp_path / "back").exists()
    with pytest.raises(ValueError, match="--lora-scope 'reward'"):
        export_hf(tmp_path / "policy", tmp_path / "back", lora_scope="reward")
    export_hf(tmp_path / "policy", tmp_path / "back", lora_scope="critic", show_progress=False)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "edit, named",
    [
        ({"model_type": "llama"}, "model_type: 'llama' is not supported"),
        ({"architectures": ["CohereModel"]}, "architectures"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters"),
        ({"attention_bias": True}, "attention_bias: True is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act: 'gelu' is not supported"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config: unsupported"),
        ({"position_embedding_type": "rope_neox"}, "position_embedding_type"),
        ({"rope_parameters": None, "rope_theta": None}, "rope_theta: must be given"),
    ],
)
def test_unsupported_configs_are_refused_by_name(tmp_path, edit, named):
    hf_dir = save_hf_dir(tiny_hf_model("cohere"), tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(edit)
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=named):
        import_hf(hf_dir, tmp_path / "ours", show_progress=False)
    assert not (tmp_path / "ours").exists()


def test_untied_missing_and_pickled_weights_are_refused(tmp_path):
    hf = tiny_hf_model("cohere")
    hf_dir = save_hf_dir(hf, tmp_path / "hf", shard="10GB")
    tensors = load_file(hf_dir / "model.safetensors")
    from safetensors.torch import save_file

    save_file(
        {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1},
        hf_dir / "model.safetensors",
    )
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        import_hf(hf_dir, tmp_path / "ours", show_progress=False)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(
        {**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)},
        hf_dir / "model.safetensors",
    )
    with pytest.raises(ValueError) as info:
        import_hf(hf_dir, tmp_path / "ours", show_progress=False)
    assert "missing tensors ['model.layers.1.mlp.up_proj.weight']" in str(info.value)
    assert "unexpected tensors ['model.layers.0.self_attn.q_proj.bias']" in str(info.value)
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"pickled weights \['pytorch_model.bin'\]"):
        import_hf(hf_dir, tmp_path / "ours", show_progress=False)


SLIDING = {"layer_types": ("sliding", "full"), "sliding_window": 4}


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"use_xpos": True}, "use_xpos: use_xpos cannot be expressed"),
        ({"qk_norm": True}, "qk_norm: the cosine qk-norm cannot be expressed"),
        (
            {**SLIDING, "rotary_layers": (True, True)},
            "rotary_layers: Cohere2 rotates exactly its sliding layers",
        ),
        (
            {**SLIDING, "rotary_layers": (True, False), "qk_layernorm": True},
            "qk_layernorm: Cohere2 has no qk-norm",
        ),
        (
            {"dim_head": 16, "layer_types": ("full", "full"), "rotary_layers": (False, False)},
            "dim_head: Cohere2 fixes",
        ),
    ],
)
def test_inexpressible_checkpoints_are_refused_by_name(tmp_path, overrides, named):
    config = PaLMConfig(
        **{**dict(num_tokens=259, dim=32, depth=2, heads=4, dim_head=8), **overrides}
    )
    PaLM(config).save_pretrained(tmp_path / "ckpt")
    assert main(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 2
    with pytest.raises(ValueError, match=named):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", show_progress=False)
    assert not (tmp_path / "hf").exists()


def test_cli_refuses_a_non_empty_out_and_a_reward_model(tmp_path, capsys):
    hf_dir = save_hf_dir(tiny_hf_model("cohere"), tmp_path / "hf")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "notes.txt").write_text("mine")
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "ours")]) == 2
    assert "--out" in capsys.readouterr().err
    # Even --overwrite never deletes a file the conversion did not write.
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "ours"), "--overwrite"]) == 2
    assert "refusing to overwrite a directory holding other files ['notes.txt']" in (
        capsys.readouterr().err
    )
    assert (tmp_path / "ours" / "notes.txt").read_text() == "mine"
    # An earlier import is replaced only with --overwrite.
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "again")]) == 0
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "again")]) == 2
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "again"), "--overwrite"]) == 0
    from palm_rlhf import RewardModel

    RewardModel(
        PaLM(PaLMConfig(num_tokens=259, dim=32, depth=1, heads=4, dim_head=8))
    ).save_pretrained(tmp_path / "rm")
    assert main(["export-hf", str(tmp_path / "rm"), "--out", str(tmp_path / "x")]) == 2
    assert "a reward model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tokenizers


TRICKY = ["", "plain ascii", "  leading spaces\n\ttabs", "héllo wörld ✓ 日本語 🙂", "<eos> <pad>"]


def test_a_byte_checkpoint_exports_an_equivalent_tokenizer(tmp_path):
    byte_tokenizer = ByteTokenizer()
    exported = HFTokenizer(byte_tokenizer_files(64))
    for text in TRICKY:
        ids = byte_tokenizer.encode(text)
        if "<" not in text:  # "<eos>" typed as text is bytes to us, one special token to HF
            assert exported.encode(text) == ids, text
        assert exported.decode(ids) == byte_tokenizer.decode(ids), text
    for role in ("pad_id", "bos_id", "eos_id"):
        assert getattr(exported, role) == getattr(byte_tokenizer, role)
    # The exported directory loads in transformers, whose tokenizer encodes as ours does.
    config = PaLMConfig(num_tokens=259, dim=32, depth=2, heads=4, dim_head=8, max_seq_len=64)
    torch.manual_seed(0)
    model = PaLM(config)
    model.save_pretrained(tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf", show_progress=False)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = TRICKY[3]
    assert auto(text, add_special_tokens=False)["input_ids"] == byte_tokenizer.encode(text)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.tensor([byte_tokenizer.encode(text, add_bos=True)])
    with torch.no_grad():
        assert close(reloaded(tokens).logits, model(tokens))


def test_hf_tokenizer_reads_special_tokens_stop_ids_and_chat_template():
    tokenizer = HFTokenizer(tokenizer_files())
    backend = tokenizer.backend
    assert tokenizer.bos_id == backend.token_to_id("<BOS_TOKEN>")
    assert tokenizer.eos_id == backend.token_to_id("<|END_OF_TURN_TOKEN|>")
    assert tokenizer.pad_id == backend.token_to_id("<PAD>")
    assert tokenizer.stop_ids == (tokenizer.eos_id, backend.token_to_id("<EOS_TOKEN>"))
    text = "def wrap(text, width=70):\n    return text"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    # An embedding row the tokenizer has no token for (VOCAB > vocab_size) decodes to nothing.
    assert tokenizer.decode([*tokenizer.encode(text), tokenizer.vocab_size + 3]) == text
    with pytest.raises(ValueError, match="negative token id"):
        tokenizer.decode([-1])
    assert len(tokenizer.encode(text)) < 0.8 * len(text)  # merges: a real BPE, not bytes
    assert tokenizer.encode(text, add_bos=True, add_eos=True)[
        :: len(tokenizer.encode(text)) + 1
    ] == [
        tokenizer.bos_id,
        tokenizer.eos_id,
    ]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tokenizer.render_chat(chat)
    assert rendered == (
        "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    )
    ids = tokenizer.encode_chat(rendered)
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.eos_id) == 2
    # The same rendering as transformers' apply_chat_template.
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<BOS_TOKEN>", eos_token="<|END_OF_TURN_TOKEN|>"
    )
    fast.chat_template = tokenizer.chat_template
    assert fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == rendered
    with pytest.raises(ValueError, match="chat template: unknown role tool"):
        tokenizer.render_chat([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"pad_token": None}, "no pad_token"),
        ({"bos_token": "<NOT_THERE>"}, "bos_token '<NOT_THERE>' is not in the vocabulary"),
        ({"pad_token": "<|END_OF_TURN_TOKEN|>"}, "pad_token must differ"),
    ],
)
def test_unusable_tokenizers_are_refused(edit, message):
    files = tokenizer_files()
    config = {k: v for k, v in {**json.loads(files["tokenizer_config.json"]), **edit}.items() if v}
    generation = json.loads(files["generation_config.json"])
    generation.pop("pad_token_id")
    files = {
        **files,
        "tokenizer_config.json": json.dumps(config),
        "generation_config.json": json.dumps(generation),
    }
    with pytest.raises(ValueError, match=message):
        HFTokenizer(files)


def test_special_tokens_and_template_from_the_other_files():
    # Hub repositories spread these over several files: special_tokens_map.json (a string or
    # {"content": ...} per token) and chat_template.jinja, which wins over tokenizer_config.json.
    files = tokenizer_files()
    config = json.loads(files["tokenizer_config.json"])
    for key in ("bos_token", "eos_token", "pad_token"):
        del config[key]
    special = {
        "bos_token": {"content": "<BOS_TOKEN>", "lstrip": False},
        "eos_token": "<EOS_TOKEN>",
        "pad_token": "<PAD>",
    }
    files = {
        **files,
        "tokenizer_config.json": json.dumps(config),
        "special_tokens_map.json": json.dumps(special),
        "chat_template.jinja": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
    }
    tokenizer = HFTokenizer(files)
    assert tokenizer.bos_id == tokenizer.backend.token_to_id("<BOS_TOKEN>")
    assert tokenizer.eos_id == tokenizer.backend.token_to_id("<EOS_TOKEN>")
    end_of_turn = tokenizer.backend.token_to_id("<|END_OF_TURN_TOKEN|>")
    assert tokenizer.stop_ids == (tokenizer.eos_id, end_of_turn)  # generation_config adds it
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "[hi]"
