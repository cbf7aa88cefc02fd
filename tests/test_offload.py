"""quantize_nvfp4_offload.py on CPU: a tiny model split across CPU and disk, layer-by-layer calibration."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import faults
import quantize_nvfp4 as q
import quantize_nvfp4_offload as offload
from conftest import ROOT, assert_phases_add_up, assert_usage_error, run_cli, timed_run
from test_calibration import SAMPLES, amax_by_quantizer, settings, tiny_fp32_model

OFFLOAD_SCRIPT = ROOT / "quantize_nvfp4_offload.py"
FAULTS = ROOT / "tests" / "faults.py"
# --batch_size 4: several padded batches, so the layer-by-layer replay has to exclude padding too
DATA = ("--dataset_yaml", str(q.SAMPLES_YAML), "--max_samples", "24", "--max_seq_len", "192", "--batch_size", "4")
# On a GPU machine the embeddings go to the GPU, two layers to RAM, the rest to disk (accelerate keeps room for a
# 330 KB layer on the GPU and in RAM besides what it places there); a resume point after every layer
CPU_CAP = ("--max_gpu_memory", "500000", "--max_cpu_memory", "1000000", "--checkpoint_every", "1")


@pytest.fixture(scope="module")
def four_layer_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-4")
    tokenizer = q.build_tiny_tokenizer(folder, q.sample_corpus())
    q.build_tiny_model(folder, vocab_size=len(tokenizer), layers=4)
    return folder


@pytest.fixture(scope="module")
def in_memory_checkpoint(four_layer_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("in-memory") / "out"
    result = run_cli("--input_model", str(four_layer_model), "--output_model", str(out), *DATA)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def offload_cli(model, out, folder, *extra, env=None, fail_after_layer=None):
    """The offload script in a subprocess; with `fail_after_layer`, killed once that layer's resume point is in."""
    args = ["--input_model", str(model), "--output_model", str(out), "--offload_folder", str(folder), *DATA, *CPU_CAP,
            *extra]
    if fail_after_layer is None:
        return run_cli(*args, script=OFFLOAD_SCRIPT, env=env)
    return run_cli("--fail_after_layer", str(fail_after_layer), str(OFFLOAD_SCRIPT), *args, script=FAULTS, env=env)


def assert_identical(a: Path, b: Path):
    ta, tb = q.read_checkpoint_tensors(a), q.read_checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


def assert_same_on_this_device(a: Path, b: Path):
    """Identical on the CPU. On a GPU the two scripts' kernels may sum in another order (whole model against one
    layer at a time): then a rare element may land one FP8/FP4 step away, and nothing more."""
    if not torch.cuda.is_available():
        return assert_identical(a, b)
    ta, tb = q.read_checkpoint_tensors(a), q.read_checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    for kind in (torch.uint8, torch.float8_e4m3fn):  # FP4 codes, block scales: a searched scale may jump on a near-tie
        keys = [k for k in ta if ta[k].dtype == kind]
        differing = sum(int((ta[k].view(torch.uint8) != tb[k].view(torch.uint8)).sum()) for k in keys)
        assert differing < 0.02 * sum(ta[k].numel() for k in keys), (kind, differing)
    for key in (k for k in ta if ta[k].numel() == 1):  # global and input scales: a bf16 step or so
        torch.testing.assert_close(ta[key].float(), tb[key].float(), rtol=0.02, atol=0)


@pytest.mark.slow
def test_offloaded_checkpoint_is_identical_to_in_memory(four_layer_model, in_memory_checkpoint, tmp_path):
    result, wall = timed_run(offload_cli, four_layer_model, tmp_path / "out", tmp_path / "offload")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "offload plan" in result.stderr and "disk" in result.stderr
    assert_same_on_this_device(in_memory_checkpoint, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "nvfp4_manifest.json").read_text())
    assert_phases_add_up(manifest, wall, (q.STAGE_CHECKS, q.STAGE_DATA, offload.STAGE_PLACEMENT, q.STAGE_LOAD,
                                          offload.STAGE_LAYER_CALIBRATION, q.PHASE_HESSIANS, q.STAGE_SEARCH,
                                          q.STAGE_EXPORT, q.STAGE_VALIDATION))
    assert manifest["tool"] == "quantize_nvfp4_offload.py"
    # ModelOpt's streaming export wrote through write_safetensors (None otherwise; a tiny shard can round to 0.0 s)
    assert manifest["timings"]["export_shards_s"] is not None
    assert manifest["offload"]["layers_per_device"]["disk"] >= 2
    assert manifest["calibration_run"]["batches"] == 6 and manifest["calibration_run"]["padding_fraction"] > 0
    assert manifest["arguments"]["algorithm"] == "smooth_hessian"  # the default, smoothed and searched in the loop
    assert manifest["calibration_run"]["smoothing"]["norms"] == 8 == manifest["calibration_run"]["smoothing"]["of"]
    assert manifest["calibration_run"]["scale_search"]["linears"] == 28
    assert not (tmp_path / "offload" / offload.LAYERWISE_DIR).exists()  # per-layer checkpoints gone once exported
    assert "read from the model's own safetensors files" in result.stderr
    assert not list((tmp_path / "offload" / offload.WEIGHTS_DIR).rglob("*.safetensors"))  # none re-saved there


@pytest.mark.slow
def test_offloaded_max_checkpoint_is_identical_to_in_memory(four_layer_model, in_memory_checkpoint, tmp_path):
    """--algorithm max too (the default above is local_hessian, whose search moved the weights' block scales)."""
    memory, offloaded = tmp_path / "memory", tmp_path / "offloaded"
    result = run_cli("--input_model", str(four_layer_model), "--output_model", str(memory), *DATA, "--algorithm", "max")
    assert result.returncode == 0, result.stderr[-3000:]
    result = offload_cli(four_layer_model, offloaded, tmp_path / "offload", "--algorithm", "max")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_on_this_device(memory, offloaded)
    assert "scale_search" not in json.loads((offloaded / "nvfp4_manifest.json").read_text())["calibration_run"]
    max_scales, searched = q.read_checkpoint_tensors(memory), q.read_checkpoint_tensors(in_memory_checkpoint)
    assert [k for k in max_scales if k.endswith(".weight_scale") and not torch.equal(max_scales[k], searched[k])]


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoints(four_layer_model, in_memory_checkpoint, tmp_path):
    folder, out = tmp_path / "offload", tmp_path / "out"
    killed = offload_cli(four_layer_model, out, folder, "--clean_offload", fail_after_layer=1)
    assert killed.returncode != 0 and "simulated failure after layer 1" in killed.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["offload"]  # nothing half-written
    assert offload.committed_layer(folder / offload.LAYERWISE_DIR) == 1  # and --clean_offload kept the progress
    caches = sorted(p.parent.name for p in folder.rglob(f"{offload.INPUTS_FILE}.bin"))
    assert caches == ["layer_0001"]  # older layers' activation caches were pruned as calibration moved on

    assert_usage_error(offload_cli(four_layer_model, out, folder), "pass --resume")
    assert_usage_error(offload_cli(four_layer_model, out, folder, "--resume", "--seed", "7"),
                       "different job", "calibration_tokens_sha256")

    resumed = offload_cli(four_layer_model, out, folder, "--resume", "--clean_offload")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "layers 0-1 are already calibrated; continuing from layer 2" in resumed.stderr
    assert json.loads((out / "nvfp4_manifest.json").read_text())["calibration_run"]["resumed_after_layer"] == 1
    assert_same_on_this_device(in_memory_checkpoint, out)
    assert not folder.exists()  # cleaned after success


@pytest.mark.slow
def test_four_over_six_offloaded_and_resumed_equals_in_memory_and_stores_each_blocks_better_of_6_and_4(
        four_layer_model, tmp_path):
    """Killed after layer 1 and resumed: the restored layers' scales are not searched a second time."""
    from safetensors.torch import load_file

    from test_calibration import four_over_six_errors

    memory, out, folder = tmp_path / "memory", tmp_path / "out", tmp_path / "offload"
    result = run_cli("--input_model", str(four_layer_model), "--output_model", str(memory), *DATA,
                     "--algorithm", "four_over_six")
    assert result.returncode == 0, result.stderr[-3000:]
    killed = offload_cli(four_layer_model, out, folder, "--algorithm", "four_over_six",
                         fail_after_layer=1)
    assert killed.returncode != 0 and "simulated failure after layer 1" in killed.stderr
    resumed = offload_cli(four_layer_model, out, folder, "--algorithm", "four_over_six", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_on_this_device(memory, out)
    manifest = json.loads((out / "nvfp4_manifest.json").read_text())
    assert manifest["calibration_run"]["scale_search"]["linears"] == 28
    exported, source = q.read_checkpoint_tensors(memory), load_file(four_layer_model / "model.safetensors")
    on_four = []
    for name in [k[:-len(".weight_scale")] for k in exported if k.endswith(".weight_scale")]:
        weight = source[f"{name}.weight"].float()
        # normalized to 256; q/k/v and gate/up share their largest (ModelOpt unifies it before the search)
        global_amax = exported[f"{name}.weight_scale_2"].float() * 6 * 256
        assert global_amax.item() == pytest.approx(weight.abs().max().item(), rel=1e-6) if \
            name.endswith(("o_proj", "down_proj")) else global_amax.item() >= weight.abs().max().item() * (1 - 1e-6)
        stored = exported[f"{name}.weight_scale"].float() * exported[f"{name}.weight_scale_2"] * 6  # block amaxes
        six = weight.reshape(weight.shape[0], -1, 16).abs().amax(-1)
        chosen = torch.where((stored - six).abs() <= (stored - 1.5 * six).abs(), six, 1.5 * six)
        errors = [four_over_six_errors(weight, global_amax, a) for a in (chosen, six, 1.5 * six)]
        best = (errors[0] <= torch.minimum(errors[1], errors[2]) * (1 + 1e-6)).float().mean().item()
        assert best == 1.0 or (torch.cuda.is_available() and best > 0.99), (name, best)  # GPU: near-ties
        on_four.append((chosen > six).float().mean().item())
    assert 0.05 < sum(on_four) / len(on_four) < 0.95


@pytest.mark.slow
def test_offload_folder_required(four_layer_model, tmp_path):
    result = run_cli("--input_model", str(four_layer_model), "--output_model", str(tmp_path / "o"), *DATA,
                     script=OFFLOAD_SCRIPT)
    assert_usage_error(result, "--offload_folder")


@pytest.mark.slow
def test_offload_self_test():
    result = run_cli("--self_test", script=OFFLOAD_SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "offload self-test passed" in result.stderr


def test_parse_memory():
    assert offload.parse_memory("6GiB") == 6 * 2**30 and offload.parse_memory("1024") == 1024
    for bad in ("lots", "-5GB", "0"):
        with pytest.raises(Exception, match="size like|positive"):
            offload.parse_memory(bad)


def test_lookup_device():
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": "disk",
                  "lm_head": "cpu"}
    assert offload.lookup_device(device_map, "model.layers.1.mlp.up_proj.weight") == "cpu"
    assert offload.device_label(offload.lookup_device(device_map, "model.layers.0.self_attn")) == "cuda:0"
    assert offload.lookup_device({"": "disk"}, "anything.at.all") == "disk"


def test_disk_check_refuses_to_start(tmp_path):
    placement = offload.Placement({}, {"disk": 10**18}, {"disk": 4}, 0)
    job = SimpleNamespace(checkpoint_bytes=1)
    settings = SimpleNamespace(output_model=tmp_path / "out")
    folder = offload.OffloadSettings(tmp_path / "off", None, None, False, False)
    with pytest.raises(q.UsageError, match="not enough free disk for --offload_folder"):
        offload.check_offload_disk(placement, job, settings, folder)
    offload.check_offload_disk(offload.Placement({}, {"disk": 1}, {"disk": 4}, 0), job, settings, folder)



def test_weights_read_from_the_source_files_need_no_offload_disk(four_layer_model, tmp_path):
    """transformers reads disk-placed weights from a local safetensors checkpoint in place, unless a WeightConverter
    (fused MoE experts) changes them at load time: then, and for a hub model, the offload folder holds them."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(four_layer_model)
    job = SimpleNamespace(config=config, skeleton=q.empty_model(config, False))
    assert offload.read_in_place(job, SimpleNamespace(input_model=str(four_layer_model)))
    assert not offload.read_in_place(job, SimpleNamespace(input_model=str(tmp_path)))  # no safetensors there
    assert not offload.read_in_place(job, SimpleNamespace(input_model="org/model"))
    moe = SimpleNamespace(config=config, skeleton=tiny_moe_model())
    assert not offload.read_in_place(moe, SimpleNamespace(input_model=str(four_layer_model)))
    quantized = SimpleNamespace(config=SimpleNamespace(quantization_config={"quant_method": "fp8"}),
                                skeleton=job.skeleton)
    assert not offload.read_in_place(quantized, SimpleNamespace(input_model=str(four_layer_model)))
    placement = offload.Placement({}, {"disk": 10**9}, {"disk": 4}, 5, weights_read_in_place=True)
    assert placement.offload_disk_bytes == 10
    assert offload.Placement({}, {"disk": 10**9}, {"disk": 4}, 5).offload_disk_bytes == 10**9 + 10


def test_a_resumed_run_keeps_the_batches_its_first_run_chose(tmp_path):
    """--resume under another --max_gpu_memory (as the out-of-memory advice says) or on another GPU: same batches."""
    (tmp_path / offload.JOB_FILE).write_text(json.dumps({"batch_tokens": 40000}))
    assert offload.resumed_batch_tokens(offload.OffloadSettings(tmp_path, 2**30, None, False, True)) == 40000
    assert offload.resumed_batch_tokens(offload.OffloadSettings(tmp_path, 2**30, None, False, False)) is None
    (tmp_path / offload.JOB_FILE).write_text("{")
    assert offload.resumed_batch_tokens(offload.OffloadSettings(tmp_path, 2**30, None, False, True)) is None


def test_plan_names_the_gpu_room_kept_for_activations(tmp_path, capsys):
    folder = offload.OffloadSettings(tmp_path, None, None, False, False)
    with_gpu = offload.Placement({}, {"cuda:0": 2**30, "disk": 2**30}, {"cuda:0": 1, "disk": 3}, 2**20,
                                 gpu_reserve_bytes=3 * 2**30)
    offload.print_placement(with_gpu, folder)
    assert "kept on each GPU beside the weights: 3.00 GiB" in capsys.readouterr().err
    offload.print_placement(offload.Placement({}, {"disk": 2**30}, {"disk": 4}, 2**20), folder)
    assert "kept on each GPU" not in capsys.readouterr().err

def test_a_gpu_cap_that_places_nothing_on_the_gpu_is_refused(four_layer_model):
    """accelerate would run everything on the CPU; the error names the size that puts the embeddings there."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(four_layer_model)
    job = SimpleNamespace(config=config, skeleton=q.empty_model(config, False))
    run_settings = SimpleNamespace(dtype="auto")
    on_cpu = offload.Placement({"model.embed_tokens": "cpu", "model.layers": "disk", "lm_head": "disk"}, {}, {}, 0)
    with_gpu = offload.Placement({"model.embed_tokens": 0, "model.layers": "disk", "lm_head": "disk"}, {}, {}, 0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "device_count", lambda: 1)
        with pytest.raises(q.UsageError, match=r"puts no module on the GPU.*at least \d+ bytes"):
            offload.check_gpu_placement(on_cpu, job, run_settings)
        offload.check_gpu_placement(with_gpu, job, run_settings)
        patch.setattr(torch.cuda, "device_count", lambda: 0)
        offload.check_gpu_placement(on_cpu, job, run_settings)  # no GPU: the CPU is the plan


def test_a_tied_head_is_placed_with_the_input_embeddings(tmp_path):
    """A tied lm_head has no weight of its own in the checkpoint: placed apart from the embeddings (on disk, under a
    small RAM cap) its first forward would not find one. The scoring store is counted for every layer's input and
    the last output."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    job = SimpleNamespace(config=config, skeleton=q.empty_model(config, False), samples=SAMPLES)
    run_settings = SimpleNamespace(input_model="org/model", dtype="bfloat16", batch_size=None,
                                   algorithm="local_hessian", effective_bits=6.0)
    placement = offload.plan_placement(job, run_settings, offload.OffloadSettings(tmp_path, None, 650_000, False,
                                                                                  False))
    assert placement.layers_per_device.get("disk") and placement.device_map["lm_head"] == "cpu"
    scored = offload.scored_batch_tokens(job, run_settings, q.DEFAULT_BATCH_TOKENS)
    assert placement.score_store_bytes == 5 * sum(scored) * 64 * 2



def test_layer_batches_grow_into_the_room_a_gpu_cap_leaves(tmp_path, monkeypatch):
    """Under --max_gpu_memory the layer loop's batches take up to MAX_BATCH_TOKENS within half the GPU room left
    beside the cap and the reserve, which then counts them, so the plan still fits; otherwise, and where the scores
    take a subset of the batches, DEFAULT_BATCH_TOKENS."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2)
    job = SimpleNamespace(config=config, skeleton=q.empty_model(config, False), samples=SAMPLES)
    run_settings = SimpleNamespace(dtype="bfloat16", batch_size=None, algorithm="local_hessian", effective_bits=None)
    per_token = offload.layer_token_bytes(job, torch.bfloat16)
    assert per_token >= 2 * (2 * 512 + 512 + 2 * 128 + 512 + 2 * 2048 + 512 + 2048)  # in, out and every output
    card, cap = 8 * 2**30, 6 * 2**30
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda gpu: SimpleNamespace(total_memory=card))

    def tokens(cap, **changes):
        return offload.layer_batch_tokens(job, SimpleNamespace(**{**vars(run_settings), **changes}),
                                          offload.OffloadSettings(tmp_path, cap, None, False, False))

    assert tokens(None) == tokens(2**20, effective_bits=5.0) == tokens(2**20, batch_size=4) == q.DEFAULT_BATCH_TOKENS
    moe = job.skeleton
    job.skeleton = tiny_moe_model()
    assert tokens(2**20) == q.DEFAULT_BATCH_TOKENS  # fused experts: not in the estimate
    job.skeleton = moe
    assert tokens(int(0.88 * card)) == q.DEFAULT_BATCH_TOKENS  # little room: never below the default
    grown = tokens(cap)
    spare = int(card * 0.9) - cap - offload.gpu_reserve_bytes(job, run_settings, torch.bfloat16,
                                                                 q.DEFAULT_BATCH_TOKENS)
    assert q.DEFAULT_BATCH_TOKENS < grown == spare // 2 // per_token < q.MAX_BATCH_TOKENS
    assert tokens(2**20) == q.MAX_BATCH_TOKENS
    reserve = offload.gpu_reserve_bytes(job, run_settings, torch.bfloat16, grown)
    assert cap + reserve <= int(card * 0.9)
    opts = offload.OffloadSettings(tmp_path, cap, None, False, False, batch_tokens=grown)
    assert offload.max_memory_map(opts, reserve)[0] == cap  # the plan accepts it


@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-head"])
def test_the_size_an_embeddings_error_names_places_them_there(tmp_path, tied):
    """Where an lm_head of its own outweighs a decoder layer (a large vocabulary), accelerate keeps room for it
    beside the embeddings; a tied one goes with them. The size the error names is the least that puts the
    embeddings on that device."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    job = SimpleNamespace(config=config, skeleton=q.empty_model(config, False), samples=SAMPLES)
    job.skeleton.tie_weights()  # as plan_placement does
    run_settings = SimpleNamespace(input_model="org/model", dtype="bfloat16", batch_size=None,
                                   algorithm="max", effective_bits=None)
    layer = offload.largest_layer_bytes(job, torch.bfloat16)
    head = layer if tied else q.parameter_bytes(job.skeleton.lm_head, torch.bfloat16)
    assert tied or head > layer
    needed = offload.embeddings_and_layer_bytes(job, run_settings)
    assert needed == q.parameter_bytes(job.skeleton.get_input_embeddings(), torch.bfloat16) + head
    placement = offload.plan_placement(job, run_settings, offload.OffloadSettings(tmp_path, None, needed, False, False))
    assert offload.lookup_device(placement.device_map, "model.embed_tokens.weight") == "cpu"
    short = offload.plan_placement(job, run_settings, offload.OffloadSettings(tmp_path, None, needed - 1, False,
                                                                              False))
    assert offload.lookup_device(short.device_map, "model.embed_tokens.weight") == "disk"

def test_the_export_prefetches_the_next_layer_while_one_is_materialized(monkeypatch):
    """ModelOpt's streaming export opens each decoder layer's weights in order with writeback off: the next layer's
    load starts then and is put back after; any other access goes to ModelOpt's context alone."""
    import contextlib

    import modelopt.torch.quantization.utils.core_utils as core_utils

    model, events = tiny_fp32_model(), []
    layers = q.decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}

    @contextlib.contextmanager
    def modelopt_access(module, root_model, name_to_module=None, writeback=True):
        events.append(("open", names[id(module)], writeback))
        yield

    class Prefetcher:
        def __init__(self, device):
            self.started = None

        def start(self, layer):
            events.append(("prefetch", names[id(layer)]))
            self.started = layer

        def take(self):
            taken, self.started = self.started, None
            return [] if taken is None else [names[id(taken)]]

        def take_and_start(self, next_layer):
            loaded = self.take()
            if next_layer is not None:
                self.start(next_layer)
            return loaded

        def release(self, loaded):
            events.extend(("release", name) for name in loaded)

        def close(self):
            events.append(("close",))
    monkeypatch.setattr(core_utils, "enable_weight_access_and_writeback", modelopt_access)
    monkeypatch.setattr(offload, "LayerPrefetcher", Prefetcher)
    with offload.export_prefetching_layers(model, "cpu"):
        with core_utils.enable_weight_access_and_writeback(layers[1], model):  # out of order, writeback on
            pass
        for layer in layers:
            with core_utils.enable_weight_access_and_writeback(layer, model, None, writeback=False):
                events.append(("export", names[id(layer)]))
    assert core_utils.enable_weight_access_and_writeback is modelopt_access
    assert events == [("open", "model.layers.1", True),
                      ("prefetch", "model.layers.1"), ("open", "model.layers.0", False), ("export", "model.layers.0"),
                      ("open", "model.layers.1", False), ("export", "model.layers.1"), ("release", "model.layers.1"),
                      ("close",)]


# --------------------------------------------------------------------------- the layer loop, in process
def tiny_moe_model():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                            num_experts_per_tok=2, architectures=["Qwen3MoeForCausalLM"])
    return Qwen3MoeForCausalLM(config).eval()


def by_layer(model, run_settings, folder, every=1, resume_after=None):
    opts = offload.OffloadSettings(folder, None, None, False, resume_after is not None, every)
    return q.quantize_model(model, run_settings, q.always_unquantized(model), SAMPLES, "cpu", pad_id=0,
                            calibrate=lambda m, config, state: offload.calibrate_by_layer(
                                m, config, state, SAMPLES, run_settings, "cpu", opts, resume_after))


@pytest.mark.slow
@pytest.mark.parametrize("build, mode, kv_cache", [(tiny_fp32_model, "nvfp4", "fp8"), (tiny_fp32_model, "w4a8", "none"),
                                                   (tiny_moe_model, "nvfp4", "none")])
def test_layer_loop_runs_each_layer_once_with_the_scales_of_a_whole_model_forward(build, mode, kv_cache, tmp_path):
    """One pass per layer; every quantizer's amax (weights, inputs, KV cache) bit for bit the in-memory one."""
    run_settings = settings(batch_size=4, mode=mode)
    run_settings.kv_cache = kv_cache
    reference, looped = build(), build()
    expected_stats = q.quantize_model(reference, run_settings, q.always_unquantized(reference), SAMPLES, "cpu", 0)
    calls = {}
    for name in offload.decoder_layer_names(looped):
        attention = looped.get_submodule(name).self_attn  # a stand-in never reaches the layer's own modules
        attention.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    stats = by_layer(looped, run_settings, tmp_path / "offload")
    assert set(calls.values()) == {stats["batches"]} and stats["batches"] == expected_stats["batches"] == 3
    expected, got = amax_by_quantizer(reference), amax_by_quantizer(looped)
    assert expected.keys() == got.keys() and any("bmm_quantizer" in n for n in got) == (kv_cache != "none")
    assert not [n for n in expected if not torch.equal(expected[n], got[n])]
    assert stats.get("moe_expert_coverage") == expected_stats.get("moe_expert_coverage")


@pytest.mark.slow
def test_layer_loop_resumes_from_its_background_resume_point(tmp_path):
    """Killed after layer 1 of 3: layer 1's inputs were written in the background; resuming gives the same scales."""
    run_settings, folder = settings(batch_size=4), tmp_path / "offload"
    reference = tiny_moe_model()
    expected_stats = by_layer(reference, run_settings, tmp_path / "uninterrupted", every=2)
    killed = tiny_moe_model()
    with pytest.MonkeyPatch.context() as patch:
        faults.fail_after_layer(1, patch.setattr)
        with pytest.raises(RuntimeError, match="simulated failure after layer 1"):
            by_layer(killed, run_settings, folder, every=2)
    layerwise = folder / offload.LAYERWISE_DIR
    assert offload.committed_layer(layerwise) == 1
    assert sorted(p.name for p in (layerwise / "layer_0001").iterdir()) == [
        "next_inputs.bin", "next_inputs.json", offload.QUANTIZERS_FILE]
    resumed = tiny_moe_model()
    stats = by_layer(resumed, run_settings, folder, every=2, resume_after=1)
    expected, got = amax_by_quantizer(reference), amax_by_quantizer(resumed)
    assert not [n for n in expected if not torch.equal(expected[n], got[n])]
    assert stats["moe_expert_coverage"] == expected_stats["moe_expert_coverage"]


# --------------------------------------------------------------------------- --effective_bits in the layer loop
MIXED = ("--effective_bits", "6.5", "--batch_size", "auto")  # one batch, as the main script's scores batch


def looped_scores(model, run_settings, folder, store_folder) -> tuple[dict, dict]:
    """quantize_model with the layer loop and its layer-by-layer scores: (its stats, what LayerScores returned)."""
    opts = offload.OffloadSettings(folder, None, None, False, False, 1)
    store = offload.ScoringStore(offload.scoring_batches(SAMPLES, run_settings, q.DEFAULT_BATCH_TOKENS), store_folder)
    loops, seen = [], {}

    def score(model, groups):
        seen["scores"], seen["amaxes"] = offload.LayerScores(loops[0])(model, groups)
        return seen["scores"], seen["amaxes"]
    stats = q.quantize_model(model, run_settings, q.always_unquantized(model), SAMPLES, "cpu", pad_id=0,
                             calibrate=lambda m, config, state: loops.append(offload.calibrate_by_layer(
                                 m, config, state, SAMPLES, run_settings, "cpu", opts, None, store)), score=score)
    return stats, seen


@pytest.mark.slow
@pytest.mark.parametrize("on_disk", [False, True], ids=["store-in-ram", "store-on-disk"])
def test_layer_by_layer_scores_equal_the_whole_model_scores(on_disk, tmp_path):
    """fp32, the layer loop's three padded batches against the whole model's one: each linear's score under each
    format within fp32 rounding, the same FP8 weight amaxes and the same choice, NVFP4 and FP8 among it; a store on
    disk is emptied as it is read."""
    run_settings = settings(batch_size=4)
    run_settings.algorithm, run_settings.effective_bits = "local_hessian", 6.0
    expected = {}

    def whole(model, groups):
        expected["scores"], expected["amaxes"] = q.whole_model_scores(model, groups, SAMPLES, 0)
        return expected["scores"], expected["amaxes"]
    reference, looped = tiny_fp32_model(), tiny_fp32_model()
    expected_stats = q.quantize_model(reference, run_settings, q.always_unquantized(reference), SAMPLES, "cpu", 0,
                                      score=whole)
    store = tmp_path / "store" if on_disk else None
    stats, got = looped_scores(looped, run_settings, tmp_path / "offload", store)
    assert got["scores"].keys() == expected["scores"].keys() and len(got["scores"]) == 14
    for name, per_format in expected["scores"].items():
        assert got["scores"][name] == pytest.approx(per_format, rel=1e-4), name
    assert got["amaxes"].keys() == expected["amaxes"].keys()
    assert all(torch.equal(got["amaxes"][g], expected["amaxes"][g]) for g in got["amaxes"])
    chosen = stats["mixed_precision"]["per_linear"]
    assert chosen == expected_stats["mixed_precision"]["per_linear"] and {"NVFP4", "FP8"} <= set(chosen.values())
    assert not on_disk or list(store.iterdir()) == []


def test_scored_batches_are_spread_over_the_lengths_within_the_token_budget(monkeypatch):
    # six batches of 2, longest first: 128, 100, 66, 42, 24, 14 padded tokens
    run_settings, tokens = settings(batch_size=2), q.DEFAULT_BATCH_TOKENS
    assert offload.scoring_batches(SAMPLES, run_settings, tokens) == list(range(6))  # all: far below SCORE_TOKENS
    monkeypatch.setattr(offload, "SCORE_TOKENS", 200)
    assert offload.scoring_batches(SAMPLES, run_settings, tokens) == [0, 2]  # every 2nd while they fit (4: 218)
    monkeypatch.setattr(offload, "SCORE_TOKENS", 10)
    assert offload.scoring_batches(SAMPLES, run_settings, tokens) == [0]  # at least one


@pytest.fixture(scope="module")
def mixed_in_memory(four_layer_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed-in-memory") / "out"
    result = run_cli("--input_model", str(four_layer_model), "--output_model", str(out), *DATA, *MIXED)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def mixed_record(folder: Path) -> dict:
    return json.loads((folder / q.MANIFEST_NAME).read_text())["calibration_run"]["mixed_precision"]


@pytest.mark.slow
def test_effective_bits_offloaded_equals_in_memory(four_layer_model, mixed_in_memory, tmp_path):
    """The scoring store on disk (RAM capped at 1 MB): the choice, its predicted losses and every tensor are the
    main script's; the checkpoint passes --verify; the store is counted in the plan and gone after the run."""
    out, folder = tmp_path / "out", tmp_path / "offload"
    result, wall = timed_run(offload_cli, four_layer_model, out, folder, *MIXED)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"--effective_bits scoring store: 5.6 MiB on disk in {folder / offload.LAYERWISE_DIR}" in result.stderr
    expected, got = mixed_record(mixed_in_memory), mixed_record(out)
    assert got["per_linear"] == expected["per_linear"] and {"NVFP4", "FP8"} <= set(got["per_linear"].values())
    # smooth_hessian: the loop stores each layer's inputs as the layers before computed them ahead of their fold, the
    # main script's scores run the folded model: the two differ by the fold's 16-bit rounding
    assert got["predicted_loss"] == pytest.approx(expected["predicted_loss"], rel=1e-2)
    assert got.keys() == expected.keys() and got["effective_bits"] == expected["effective_bits"]
    assert_same_on_this_device(mixed_in_memory, out)
    manifest = json.loads((out / q.MANIFEST_NAME).read_text())
    hidden = json.loads((four_layer_model / "config.json").read_text())["hidden_size"]
    assert manifest["offload"]["score_store"] == {"bytes": (4 + 1) * 4608 * hidden * 2, "on_disk": True,
                                                  "batches": 1, "tokens": 4608}  # 4 layers' inputs and an output
    assert_phases_add_up(manifest, wall, (offload.STAGE_LAYER_CALIBRATION, q.STAGE_MIXED, q.STAGE_EXPORT))
    assert not (folder / offload.LAYERWISE_DIR).exists()
    verified = run_cli("--verify", str(out))
    assert verified.returncode == 0 and "OK against the config (MIXED_PRECISION, " in verified.stdout, verified.stdout


@pytest.mark.slow
@pytest.mark.parametrize("ram, place", [(("--max_cpu_memory", "30000000"), "in RAM"), ((), "on disk")],
                         ids=["store-in-ram", "store-on-disk"])
def test_effective_bits_killed_and_resumed_equals_in_memory(four_layer_model, mixed_in_memory, tmp_path, ram,
                                                            place):
    """Killed after layer 1 of 4: the resumed run replays layer 0 for layer 1's stored inputs (on disk: over the
    files the killed run left), and its checkpoint is the main script's."""
    folder, out = tmp_path / "offload", tmp_path / "out"
    killed = offload_cli(four_layer_model, out, folder, *MIXED, *ram, fail_after_layer=1)
    assert killed.returncode != 0 and "simulated failure after layer 1" in killed.stderr
    assert f"--effective_bits scoring store: 5.6 MiB {place}" in killed.stderr
    resumed = offload_cli(four_layer_model, out, folder, *MIXED, *ram, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing from layer 2" in resumed.stderr
    assert mixed_record(out)["per_linear"] == mixed_record(mixed_in_memory)["per_linear"]
    assert_same_on_this_device(mixed_in_memory, out)


@pytest.mark.slow
def test_dry_run_counts_the_scoring_store(four_layer_model, tmp_path):
    result = offload_cli(four_layer_model, tmp_path / "out", tmp_path / "offload", *MIXED, "--dry_run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--effective_bits scoring store: 5.6 MiB on disk" in result.stderr
    assert "the --effective_bits scoring store (5.6 MiB on disk" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "offload").exists() and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- GPTQ in the layer loop
def use_torch_gptq_kernels(monkeypatch) -> None:
    """ModelOpt's GPTQ runs two kernels that exist for CUDA only: the dynamic NVFP4 quantization of a linear's
    input (its Hessian pass) and the fake quantization of static weight blocks (its update). Here both are torch:
    the runtime's input quantization from quantize_nvfp4, and GPTQHelper's update through ModelOpt's own unfused
    column loop with the checkpoint's block rounding. Everything else (the passes, the update's algebra, storing
    and reading the rewritten weights, resuming) is the product's code."""
    from modelopt.torch.quantization import tensor_quant
    from modelopt.torch.quantization.tensor_quant import fp8_eager
    from modelopt.torch.quantization.utils import calib_utils

    def dynamic_block_quantize(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits,
                               scale_exponent_bits):
        assert (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4), "NVFP4 only"
        return q.fake_quant_nvfp4_input(inputs, amax.float() / (6 * q.E4M3_MAX), block_size)

    def blockwise_update(helper, block_size):
        quantizer = helper.module.weight_quantizer
        rows = helper.weight.shape[0]
        scales = fp8_eager(quantizer.amax.float().reshape(rows, -1, 1) / 6, quantizer.global_amax.float() / 6)

        def fake_quantize(weight):
            blocks = weight.reshape(rows, -1, q.HESSIAN_BLOCK)
            return (blocks - q.rounding_error(blocks, scales)).reshape(weight.shape)

        calib_utils.gptq_blockwise_update(helper.weight, helper.h_inv, block_size, fake_quantize)

    monkeypatch.setattr(tensor_quant, "dynamic_block_quantize_op", dynamic_block_quantize)
    monkeypatch.setattr(calib_utils.GPTQHelper, "_blockwise_update", blockwise_update)
    monkeypatch.setattr(q, "check_algorithm", lambda algorithm, mode: None)


@pytest.fixture
def gptq_on_cpu(monkeypatch):
    """For models on the CPU: ModelOpt's GPTQ with torch kernels."""
    use_torch_gptq_kernels(monkeypatch)


@pytest.fixture
def gptq_kernels_here(monkeypatch):
    """The real kernels where there is a GPU, torch ones elsewhere."""
    if not torch.cuda.is_available():
        use_torch_gptq_kernels(monkeypatch)


def quantized_weights(model) -> dict:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if getattr(getattr(m, "weight_quantizer", None), "is_enabled", False)}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="ModelOpt's GPTQ asks the GPU how full a CPU model's device "
                                                      "is; on a GPU the end-to-end test below runs the real kernels")
@pytest.mark.parametrize("mode", ["nvfp4", "weight_only"])
def test_layer_loop_gptq_equals_modelopts_whole_model_gptq(gptq_on_cpu, mode, tmp_path):
    """Two passes per layer (max on the 16-bit stream, Hessians on the quantized one), then ModelOpt's update:
    every rewritten weight and every amax as ModelOpt's GPTQ over the whole model leaves them. No pass records
    autograd (each cached output would keep its layer's activations alive: 36 GiB a layer on the 8B shape)."""
    run_settings = settings(batch_size=4, mode=mode)
    run_settings.algorithm = "gptq"
    reference, looped, original = tiny_fp32_model(), tiny_fp32_model(), tiny_fp32_model()
    expected_stats = q.quantize_model(reference, run_settings, q.always_unquantized(reference), SAMPLES, "cpu", 0)
    calls, grad = {}, set()
    for name in offload.decoder_layer_names(looped):
        attention = looped.get_submodule(name).self_attn
        attention.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        attention.register_forward_pre_hook(lambda m, a: grad.add(torch.is_grad_enabled()))
    stats = by_layer(looped, run_settings, tmp_path / "offload")
    assert set(calls.values()) == {2 * stats["batches"]} and grad == {False}  # the max pass and the Hessian pass
    expected, got = quantized_weights(reference), quantized_weights(looped)
    assert len(got) == 14 and not [n for n in got if torch.equal(got[n], original.get_submodule(n).weight)]
    assert_equal_tensors(expected, got)
    assert_equal_tensors(amax_by_quantizer(reference), amax_by_quantizer(looped))
    assert stats["gptq_relative_mse"].keys() == expected_stats["gptq_relative_mse"].keys() == got.keys()


def assert_equal_tensors(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    assert not [name for name in expected if not torch.equal(got[name], expected[name])]


def test_offloaded_gptq_killed_and_resumed_equals_in_memory(gptq_kernels_here, four_layer_model, tmp_path):
    """The rewritten weights reach the export from every place accelerate keeps them (on the device, in RAM, and
    from disk through our file, never the source checkpoint), also after a kill at a disk-offloaded layer."""
    import hashlib

    memory, out, folder = tmp_path / "memory", tmp_path / "out", tmp_path / "offload"
    source = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in four_layer_model.iterdir() if p.is_file()}
    common = ["--input_model", str(four_layer_model), *DATA, "--algorithm", "gptq"]
    assert q.main([*common, "--output_model", str(memory)]) == 0
    offloaded = [*common, "--output_model", str(out), "--offload_folder", str(folder), *CPU_CAP]
    with pytest.MonkeyPatch.context() as patch:
        faults.fail_after_layer(2, patch.setattr)
        with pytest.raises(RuntimeError, match="simulated failure after layer 2"):
            offload.main(offloaded)
    layerwise = folder / offload.LAYERWISE_DIR
    assert sorted(p.parent.name for p in layerwise.rglob(offload.REWRITTEN_FILE)) == [
        "layer_0000", "layer_0001", "layer_0002"]
    assert offload.main([*offloaded, "--resume"]) == 0
    assert_same_on_this_device(memory, out)
    manifest = json.loads((out / q.MANIFEST_NAME).read_text())
    assert manifest["offload"]["layers_per_device"]["disk"] >= 2
    assert manifest["calibration_run"]["resumed_after_layer"] == 2
    assert len(manifest["calibration_run"]["gptq_relative_mse"]) == 7  # layer 3's linears: run after the resume
    assert source == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in four_layer_model.iterdir()
                      if p.is_file()}
    assert not layerwise.exists()


def test_rewritten_weights_are_read_back_from_ram_and_disk_offload(tmp_path):
    """install_weights puts a tensor where accelerate's next load of that module finds it, in the structure
    transformers gives an offloaded model (one loader, a prefix per module): its RAM copy, or (disk) an index entry
    pointing at our file; the other weights stay where they were."""
    from accelerate import cpu_offload
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset
    from safetensors.torch import save_file

    model = tiny_fp32_model()
    in_ram, on_disk = model.model.layers[0].mlp, model.model.layers[1].mlp
    source = tmp_path / "source.safetensors"
    save_file({f"model.layers.1.mlp.{n}": t.contiguous() for n, t in on_disk.state_dict().items()}, str(source))
    loader = OffloadedWeightsLoader(
        state_dict={f"model.layers.0.mlp.{n}": t.clone() for n, t in in_ram.state_dict().items()},
        index={f"model.layers.1.mlp.{n}": {"safetensors_file": str(source), "weight_name": f"model.layers.1.mlp.{n}"}
               for n in on_disk.state_dict()})
    for i, mlp in enumerate((in_ram, on_disk)):
        cpu_offload(mlp, torch.device("cpu"), state_dict=PrefixedDataset(loader, f"model.layers.{i}.mlp."))
    up_before = [mlp.up_proj(torch.ones(1, 64)) for mlp in (in_ram, on_disk)]
    rewritten = {f"model.layers.{i}.mlp.down_proj.weight": torch.full((64, 128), float(i + 1)) for i in (0, 1)}
    ours = tmp_path / "offload" / offload.REWRITTEN_FILE
    offload.keep_rewritten_weights(dict(model.named_modules()), rewritten, ours)
    for i, mlp in enumerate((in_ram, on_disk)):
        assert torch.equal(mlp.down_proj(torch.ones(1, 128)), torch.full((1, 64), 128.0 * (i + 1)))
        assert torch.equal(mlp.up_proj(torch.ones(1, 64)), up_before[i])
        assert mlp.down_proj.weight.device.type == "meta"  # still offloaded
    assert loader.index["model.layers.1.mlp.down_proj.weight"]["safetensors_file"] == str(ours)
    assert loader.index["model.layers.1.mlp.up_proj.weight"]["safetensors_file"] == str(source)
    assert "model.layers.1.mlp.down_proj.weight" not in loader.state_dict  # not held in RAM


def test_resume_tensors_round_trip_as_raw_bytes(tmp_path):
    tensors = [torch.randn(2, 3, 5).to(torch.bfloat16), torch.randn(4, 7), torch.arange(6).reshape(2, 3)]
    offload.write_tensors(tmp_path / "cache", tensors)
    assert (tmp_path / "cache.bin").stat().st_size == sum(t.numel() * t.element_size() for t in tensors)
    back = offload.read_tensors(tmp_path / "cache", "cpu")
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(tensors, back)) and len(back) == 3
    assert not list(tmp_path.glob("*.tmp"))
    with open(tmp_path / "cache.bin", "r+b") as handle:  # what a power loss can leave: the file, not its bytes
        handle.seek(20)
        handle.write(b"\0\0\0\0")
    with pytest.raises(q.UsageError, match="is damaged"):
        offload.read_tensors(tmp_path / "cache", "cpu")


def test_a_failed_background_write_stops_the_run(tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    writer = offload.ResumeWriter(tmp_path / "not-a-folder", {"format": offload.RESUME_FORMAT})
    writer.submit(0, {0: {"quantizer_state": {}}}, [torch.ones(2)])
    with pytest.raises(RuntimeError, match="writing a resume point"):
        writer.wait()


@pytest.mark.slow
def test_eval_streamed_layer_by_layer_equals_the_whole_model_report(four_layer_model, tmp_path):
    """--eval here streams the original and the emulated files one decoder layer at a time (decoder layers read
    from disk): the numbers are those of quantize_nvfp4.py --verify --eval on the same files; the gate fails the
    run with the checkpoint written."""
    out = tmp_path / "out"
    result, wall = timed_run(offload_cli, four_layer_model, out, tmp_path / "off", "--eval_samples", "8",
                             "--max_ppl_increase", "0")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "more than --max_ppl_increase 0.0%" in result.stderr
    assert_phases_add_up(json.loads((out / q.MANIFEST_NAME).read_text()), wall, (q.STAGE_QUALITY,))
    streamed = json.loads((out / "quality_report.json").read_text())
    assert streamed["samples"] == 8 and streamed["method"].endswith("layer by layer")
    assert streamed["quantized_tensors_emulated"] == sum(1 for k in q.read_checkpoint_tensors(out)
                                                         if k.endswith(".weight_scale"))
    assert not (tmp_path / "off" / offload.EVAL_WEIGHTS_DIR).exists()

    args = q.build_parser().parse_args(["--verify", str(out), "--eval", "--reference", str(four_layer_model),
                                        "--eval_samples", "8", *DATA])
    expected, _ = q.existing_quality_report(args, {})
    assert expected["tokens"] == streamed["tokens"]
    for key in ("perplexity_original", "perplexity_quantized", "mean_kl", "top1_agreement"):
        assert streamed[key] == pytest.approx(expected[key], rel=1e-3, abs=1e-4), key


@pytest.mark.slow
def test_refusals_before_loading(four_layer_model, tmp_path):
    """--eval with a quantized KV cache is not streamed layer by layer (named with the command that does it, in
    the dry run too), nor into a folder holding files; checking a checkpoint is the main script's; a foreign folder
    in the offload folder where the resume points go is not ours to delete."""
    for extra in ((), ("--dry_run",)):
        result = offload_cli(four_layer_model, tmp_path / "out", tmp_path / "off", "--eval", "--kv_cache", "fp8",
                             *extra)
        assert_usage_error(result, "--eval with --kv_cache fp8",
                           "python quantize_nvfp4.py --verify OUT --eval --reference MODEL")
    leftover = tmp_path / "off" / offload.EVAL_WEIGHTS_DIR
    leftover.mkdir(parents=True)
    (leftover / "notes.txt").write_text("the user's")
    result = offload_cli(four_layer_model, tmp_path / "out", tmp_path / "off", "--eval", "--dry_run")
    assert_usage_error(result, "eval_weights is not empty", "choose another --offload_folder")
    assert (leftover / "notes.txt").read_text() == "the user's"
    result = offload_cli(four_layer_model, tmp_path / "out", tmp_path / "off", "--verify", str(tmp_path / "out"))
    assert_usage_error(result, "run python quantize_nvfp4.py --verify DIR")
    foreign = tmp_path / "off" / offload.LAYERWISE_DIR
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("the user's")
    result = offload_cli(four_layer_model, tmp_path / "out", tmp_path / "off")
    assert_usage_error(result, "this script did not write it")
    assert (foreign / "notes.txt").read_text() == "the user's" and not (tmp_path / "out").exists()


def test_prefetcher_loads_the_next_layer_and_puts_it_back():
    """The background load is accelerate's own (the offload hook's pre_forward): the weights the layer
    computes with are the offloaded ones; release returns them to meta; a failed load is raised on take."""
    from accelerate import cpu_offload

    model = tiny_fp32_model()
    layer = model.model.layers[1]
    expected = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    cpu_offload(layer, execution_device=torch.device("cpu"))
    assert all(p.device.type == "meta" for p in layer.parameters())
    prefetch = offload.LayerPrefetcher("cpu")
    prefetch.start(layer)
    loaded = prefetch.take()
    assert loaded and all(torch.equal(expected[name], tensor) for name, tensor in layer.state_dict().items())
    assert offload.offloaded_modules(layer) == []  # loaded: ModelOpt's weight-access context leaves it as it is
    prefetch.release(loaded)
    assert all(p.device.type == "meta" for p in layer.parameters())
    prefetch.start(model.model.layers[0])  # held in memory: nothing to load
    assert prefetch.take() == []

    class Broken:
        def pre_forward(self, module):
            raise OSError("offload file unreadable")

    prefetch.launch(prefetch._load, [(layer, Broken())], name="layer-prefetch")
    with pytest.raises(OSError, match="offload file unreadable"):
        prefetch.take()


@pytest.mark.slow
def test_offload_benchmark_runs_tiny_with_fresh_process_pairs(tmp_path):
    """benchmarks/bench_offload.py --tiny: the in-process variants, then (a) and (c) each in a fresh process."""
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_offload.py"), "--tiny",
                             "--checkpoint_every", "auto", "--fresh_processes", "1", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["checkpoint_comparison"]["identical"]
    fresh = report["results"]["fresh_processes"]
    assert [len(fresh["runs"][v]) for v in ("a", "c")] == [1, 1] and len(fresh["c_vs_a_cold"]) == 1
    assert all(run["calibration_s"] > 0 for v in ("a", "c") for run in fresh["runs"][v])
