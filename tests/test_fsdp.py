"""FSDP through accelerate's FSDP plugin: the checkpoint hooks write gathered full weights, the unsupported setups stop
before training, and (on a GPU, `-m gpu`) one single-process FSDP run checkpoints, resumes and exports.

accelerate (1.16) runs FSDP on GPUs only (its state picks `DistributedType.FSDP` for GPU-like devices), so on the CPU
the hooks are driven by a stand-in accelerator; the real run is `test_single_process_fsdp_...` (scripts/gpu_check.sh).
"""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from diffusers import DiffusionPipeline, DiTTransformer2DModel
from helpers import REPO, run_script, write_class_folder
from safetensors.torch import load_file

from sadm.accelerate_setup import check_fsdp
from sadm.checkpointing import full_state_dict, list_checkpoints, register_model_hooks
from sadm.models.dit import build_dit
from sadm.models.structure_discriminator import StructureDiscriminator

FSDP_1GPU = REPO / "configs" / "accelerate" / "fsdp_1gpu.yaml"


class GatheringAccelerator:
    """What the hooks use of an FSDP accelerator; `get_state_dict` stands for the collective gather of FSDP2 (each
    call is recorded, and it returns `gathered[i]`, not the module's own tensors, so the test sees which were written)."""

    distributed_type = DistributedType.FSDP
    is_fsdp2 = True

    def __init__(self, gathered: list[dict], is_main_process: bool):
        self.gathered, self.is_main_process, self.num_processes = gathered, is_main_process, 2
        self.calls, self.save_hooks, self.load_hooks = [], [], []
        self.state = SimpleNamespace(fsdp_plugin=SimpleNamespace(use_orig_params=True))

    def register_save_state_pre_hook(self, hook):
        self.save_hooks.append(hook)

    def register_load_state_pre_hook(self, hook):
        self.load_hooks.append(hook)

    def unwrap_model(self, model):
        return model

    def get_state_dict(self, model, unwrap=True):
        self.calls.append(model)
        return self.gathered[len(self.calls) - 1] if self.is_main_process else {}


def two_models(seed: int):
    torch.manual_seed(seed)
    dit = build_dit("tiny", sample_size=8, in_channels=1, num_classes=2, seed=seed)
    disc = StructureDiscriminator(in_channels=1, sample_size=8, base_channels=8, embed_dim=16)
    return [dit, disc]


@pytest.mark.parametrize("is_main_process", [True, False], ids=["main", "other"])
def test_fsdp_save_hook_gathers_on_every_process_and_the_main_one_writes_the_full_weights(tmp_path, is_main_process):
    models = two_models(seed=0)  # this process's modules (their own tensors must NOT be what is written)
    full = [{k: v.clone() for k, v in m.state_dict().items()} for m in two_models(seed=1)]  # "gathered" weights
    accelerator = GatheringAccelerator(full, is_main_process)
    register_model_hooks(accelerator, ["transformer", "discriminator"])
    weights = []
    accelerator.save_hooks[0](list(models), weights, str(tmp_path))
    assert accelerator.calls == models  # every process takes part in every model's gather (a collective)
    if not is_main_process:
        assert list(tmp_path.iterdir()) == []
        return
    for name, model, expected in zip(["transformer", "discriminator"], models, full):
        loaded = type(model).from_pretrained(tmp_path / name)  # an ordinary diffusers folder
        state = loaded.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected), name
        assert any(not torch.equal(model.state_dict()[k], expected[k]) for k in expected)  # not the local tensors


def test_fsdp_load_hook_leaves_the_models_to_accelerate(tmp_path):
    """Under FSDP accelerate loads the models from its own files and passes the hook no model: nothing to load."""
    accelerator = GatheringAccelerator([], True)
    register_model_hooks(accelerator, ["transformer", "discriminator"])
    accelerator.load_hooks[0]([], str(tmp_path))  # an empty folder: any read would fail


def test_a_term_exports_the_gathered_discriminator_weights_when_given(tmp_path):
    """The export under FSDP with several processes passes each term its discriminator's gathered weights."""
    from sadm.structure import StructureConfig
    from sadm.terms import StructureTerm

    local, gathered = two_models(seed=0)[1], two_models(seed=1)[1].state_dict()
    accelerator = SimpleNamespace(unwrap_model=lambda m: m)
    term = StructureTerm(StructureConfig(weight=0.1), local, torch.optim.AdamW(local.parameters()), accelerator)
    term.save_pretrained(str(tmp_path / "gathered"), gathered)
    term.save_pretrained(str(tmp_path / "own"))
    for folder, expected in (("gathered", gathered), ("own", local.state_dict())):
        written = StructureDiscriminator.from_pretrained(tmp_path / folder / term.model_name).state_dict()
        assert all(torch.equal(written[k], expected[k]) for k in expected), folder


def test_full_state_dict_is_the_plain_state_dict_without_fsdp():
    model = build_dit("tiny", sample_size=8, in_channels=1, num_classes=2, seed=0)
    accelerator = SimpleNamespace(distributed_type=DistributedType.NO, unwrap_model=lambda m: m)
    state = full_state_dict(accelerator, model)
    assert state.keys() == model.state_dict().keys()


def test_unsupported_fsdp_setups_stop_with_the_reason():
    def fsdp(num_processes=1, fsdp2=False, use_orig_params=True):
        accelerator = GatheringAccelerator([], True)
        accelerator.num_processes, accelerator.is_fsdp2 = num_processes, fsdp2
        accelerator.state.fsdp_plugin.use_orig_params = use_orig_params
        return accelerator

    check_fsdp(fsdp(), "full", use_ema=True)  # one process, FSDP1, EMA: supported (scripts/gpu_check.sh)
    check_fsdp(fsdp(num_processes=8), "full", use_ema=False)
    check_fsdp(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU), "lora", use_ema=True)  # not FSDP
    for accelerator, trainable, use_ema, message in (
        (fsdp(fsdp2=True), "full", False, "fsdp_version: 1"),
        (fsdp(use_orig_params=False), "full", False, "fsdp_use_orig_params: true"),
        (fsdp(), "lora", False, "--trainable lora"),
        (fsdp(num_processes=8), "full", True, "--no-use_ema"),
    ):
        with pytest.raises(ValueError, match=message):
            check_fsdp(accelerator, trainable, use_ema)
    check_fsdp(fsdp(), "full", use_ema=True, validation_steps=100, eval_steps=100)  # one process: it samples
    with pytest.raises(ValueError, match="--validation_steps 100 / --eval_steps 0"):
        check_fsdp(fsdp(num_processes=8), "full", use_ema=False, validation_steps=100)


def test_the_single_gpu_fsdp_config_is_valid_for_launch_and_wraps_every_model():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin

    config = load_config_from_file(str(FSDP_1GPU))
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(FSDP_1GPU), "x.py"]))
    assert args.use_fsdp and args.num_processes == 1 and config.distributed_type == "FSDP"
    fsdp_config = config.fsdp_config
    assert fsdp_config["fsdp_version"] == 1 and fsdp_config["fsdp_use_orig_params"]  # what check_fsdp requires
    assert fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    # accelerate resolves the wrap policy on the first model prepared (the DiT) and reuses it for the discriminators
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=1,
        auto_wrap_policy=fsdp_config["fsdp_auto_wrap_policy"],
        transformer_cls_names_to_wrap=[fsdp_config["fsdp_transformer_layer_cls_to_wrap"]],
        sync_module_states=fsdp_config["fsdp_sync_module_states"],
    )
    for model in two_models(seed=0):  # the prepare order of train_sadm.py: transformer first
        plugin.set_auto_wrap_policy(model)


@pytest.mark.slow  # two processes over gloo: ~20 s here
def test_save_hook_on_real_fsdp1_shards_of_two_processes_writes_the_full_trained_weights(tmp_path):
    """tests/fsdp_hooks_worker.py: torch's FSDP1 on 2 CPU processes with fsdp.yaml's strategy and wrapping."""
    from accelerate.commands.config.config_args import load_config_from_file

    strategy = load_config_from_file(str(REPO / "configs" / "accelerate" / "fsdp.yaml")).fsdp_config[
        "fsdp_sharding_strategy"
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    worker = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              str(REPO / "tests" / "fsdp_hooks_worker.py"), str(tmp_path), strategy]  # fmt: skip
    result = subprocess.run(worker, capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert result.returncode == 0, result.stderr[-4000:]
    local = torch.load(tmp_path / "local_rank0.pt", weights_only=True)
    assert any(v.dim() == 1 and "norm" not in k and "bias" not in k for k, v in local.items())  # flat shards
    initial = build_dit("tiny", sample_size=8, in_channels=1, num_classes=2, seed=0).state_dict()
    for name, cls in (("transformer", DiTTransformer2DModel), ("discriminator", StructureDiscriminator)):
        reference = torch.load(tmp_path / "reference" / f"{name}.pt", weights_only=True)
        written = cls.from_pretrained(tmp_path / "checkpoint" / name).state_dict()
        assert written.keys() == reference.keys()
        for key in reference:  # gradients averaged over 2 identical batches: the same AdamW step as one process
            torch.testing.assert_close(written[key], reference[key], rtol=0, atol=1e-6, msg=f"{name}.{key}")
    moved = max((reference_t - initial[k]).abs().max().item() for k, reference_t in
                torch.load(tmp_path / "reference" / "transformer.pt", weights_only=True).items())  # fmt: skip
    assert moved > 1e-3  # the step changed the weights: the written ones are the trained ones


# ---------------------------------------------------------------------------------------------- on one CUDA device
TINY = ["--model", "tiny", "--resolution", "8", "--train_batch_size", "4", "--validation_steps", "0",
        "--report_to", "none", "--checkpointing_steps", "2", "--use_ema", "--learn_sigma"]  # fmt: skip
TERMS = {
    "dsm": [],
    "sadm+gan": ["--structure_loss_weight", "0.05", "--structure_warmup_steps", "0", "--structure_t_threshold",
                 "1000", "--gan_loss_weight", "0.05"],
}  # fmt: skip


def fsdp_run(out, data_dir, steps: int, *flags: str):
    result = run_script(
        "train_sadm.py", *TINY, "--train_data_dir", str(data_dir), "--output_dir", str(out), "--max_train_steps",
        str(steps), *flags, cpu=False, launch_args=("--config_file", str(FSDP_1GPU)), timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.gpu
@pytest.mark.parametrize("terms", list(TERMS))
def test_single_process_fsdp_trains_checkpoints_resumes_and_exports(tmp_path, terms):
    data_dir = write_class_folder(tmp_path / "data", classes=("a", "b"), per_class=8, size=8, mode="L")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fsdp_run(resumed, data_dir, 2, *TERMS[terms])
    second = fsdp_run(resumed, data_dir, 4, *TERMS[terms], "--resume_from_checkpoint", "latest")
    assert "Resuming from" in second.stdout + second.stderr
    assert [p.name for p in list_checkpoints(resumed)] == ["checkpoint-2", "checkpoint-4"]

    subs = ["transformer"] + (["discriminator", "timestep_discriminator"] if terms != "dsm" else [])
    for checkpoint in list_checkpoints(resumed):
        assert (checkpoint / "pytorch_model_fsdp.bin").exists()  # accelerate's FSDP save path ran, not a plain one
        # the save hook's folder holds the gathered full weights: equal to accelerate's FULL_STATE_DICT file
        fsdp_state = torch.load(checkpoint / "pytorch_model_fsdp.bin", map_location="cpu", weights_only=True)
        ours = load_file(str(checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"))
        assert ours.keys() == fsdp_state.keys()
        assert all(torch.equal(ours[k], fsdp_state[k].to(ours[k].dtype)) for k in ours)
        loaded = DiTTransformer2DModel.from_pretrained(checkpoint / "transformer")
        assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in ours.items()}
        for sub in subs:  # every model folder: full, finite tensors
            state = load_file(str(checkpoint / sub / "diffusion_pytorch_model.safetensors"))
            assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), sub

    pipe = DiffusionPipeline.from_pretrained(resumed).to("cuda")
    images = pipe(class_labels=[0, 1], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and bool(torch.isfinite(torch.from_numpy(images)).all())
    if terms != "dsm":  # the exactness of the resume is checked once (the GPU check has a time budget)
        return
    # the resumed run continues an uninterrupted one: closer to it than 5% of what its last two steps moved
    # (CUDA kernels need not be bitwise deterministic, e.g. the atomics of the label embedding's backward)
    fsdp_run(straight, data_dir, 4, *TERMS[terms])
    for sub in subs:
        name = f"{sub}/diffusion_pytorch_model.safetensors"
        a, b = load_file(str(straight / "checkpoint-4" / name)), load_file(str(resumed / "checkpoint-4" / name))
        before = load_file(str(straight / "checkpoint-2" / name))
        moved = max((a[k].float() - before[k].float()).abs().max().item() for k in a)
        gap = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert moved > 0 and gap <= 0.05 * moved, (sub, gap, moved)
