"""Bring your own CIFAR-10 classifier: a network from outside, in each format people share one in, loads
safely and predicts as it does itself, through the study and `predict`; a file that cannot work is
refused in one line that names it and the fix."""

import io
import warnings
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from cifar_lightning.attacks import pgd, run_attack
from cifar_lightning.checkpoints import CheckpointError
from cifar_lightning.data import CIFAR10_MEAN, CIFAR10_STD, CLASSES, load_cifar10
from cifar_lightning.loading import EXPORTED, SAFETENSORS, STATE_DICT, TORCHSCRIPT, load_network, read_model_file
from cifar_lightning.models import ImprovedCNN, Normalized
from cifar_lightning.module import ClassifierModule
from tests.conftest import small_subset
from tests.helpers import CONFIG, Payload, callback_args, cli_error, run_cli, write_config, write_slice
from tests.small_resnet import SmallResNet

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights" / "improvedcnn_cifar10.ckpt"
RESNET = "tests.small_resnet.SmallResNet"
# What a `cifar-lightning` subprocess needs to import RESNET, as a user's package would be installed.
IMPORTABLE = {"PYTHONPATH": str(REPO)}
FORMATS = {  # file → the format read from its content (both .pt files: the suffix decides nothing)
    "state_dict.pt": STATE_DICT,
    "nested_state_dict.pth": STATE_DICT,
    "nested_model.pt": STATE_DICT,
    "data_parallel.pt": STATE_DICT,
    "lightning_keys.pt": STATE_DICT,
    "resnet.safetensors": SAFETENSORS,
    "resnet.pt2": EXPORTED,
    "torchscript.pt": TORCHSCRIPT,
}


@pytest.fixture(scope="module")
def test_set(cifar_slice) -> tuple[torch.Tensor, torch.Tensor]:
    """The slice's 256 test images (N, 3, 32, 32) in [0, 1] and their labels (N,)."""
    images, labels = load_cifar10(cifar_slice, train=False)
    return images.float() / 255, labels


def _normalised(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def resnet(cifar_slice) -> SmallResNet:
    """A seeded SmallResNet (taking CIFAR-10-normalised images) in eval mode, its batch-norm statistics
    those of 256 real training images, so a file that lost them would predict otherwise."""
    torch.manual_seed(0)
    network = SmallResNet()
    images = _normalised(load_cifar10(cifar_slice, train=True)[0][:256].float() / 255)
    with torch.no_grad():
        for batch in images.split(64):
            network(batch)
    return network.eval()


@pytest.fixture(scope="module")
def reference(resnet, test_set) -> torch.Tensor:
    """The network's own logits (N, 10) for the test images."""
    with torch.no_grad():
        return Normalized(resnet, CIFAR10_MEAN, CIFAR10_STD)(test_set[0])


def _script(network: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", FutureWarning)
        return torch.jit.script(network)


def _export(network: torch.nn.Module, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    return torch.export.export(network, (torch.rand(2, 3, 32, 32),), dynamic_shapes=shapes)


@pytest.fixture(scope="module")
def saved(resnet, tmp_path_factory) -> Path:
    """A folder with the network in each of :data:`FORMATS`, saved as people save one."""
    folder = tmp_path_factory.mktemp("formats")
    state = resnet.state_dict()
    for name, content in [
        ("state_dict.pt", state),
        ("nested_state_dict.pth", {"state_dict": state, "epoch": 7}),
        ("nested_model.pt", {"model": state, "optimizer": {"lr": 0.1}}),
        ("data_parallel.pt", {f"module.{key}": value for key, value in state.items()}),
        ("lightning_keys.pt", {"state_dict": {f"net.model.{key}": value for key, value in state.items()}}),
    ]:
        torch.save(content, folder / name)
    save_file(state, folder / "resnet.safetensors")
    torch.export.save(_export(resnet), folder / "resnet.pt2")
    _script(resnet).save(folder / "torchscript.pt")
    return folder


def _module_with(model_file) -> ClassifierModule:
    """A ClassifierModule holding the file's model as the CLI puts it in: a state_dict into a freshly
    initialised SmallResNet, a program in place of the default network."""
    torch.manual_seed(1)
    module = ClassifierModule(network=None if model_file.is_program else SmallResNet())
    module.net.model = load_network(model_file, module.net.model)
    module.train()  # Lightning switches modes; an exported program's own module refuses to
    return module.eval()


@pytest.mark.parametrize(("name", "format_"), FORMATS.items())
def test_each_format_loads_and_predicts_as_the_network_itself(saved, test_set, reference, name, format_):
    model_file = read_model_file(saved / name)
    assert model_file.format == format_
    with torch.no_grad():
        logits = _module_with(model_file)(test_set[0])
    assert torch.equal(logits.argmax(1), reference.argmax(1))
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet.pt2", "torchscript.pt"])
def test_attacks_get_gradients_through_a_program(saved, test_set, name):
    net = _module_with(read_model_file(saved / name)).net
    images, labels = test_set[0][:8].clone().requires_grad_(), test_set[1][:8]
    torch.nn.functional.cross_entropy(net(images), labels).backward()
    assert images.grad.abs().sum() > 0
    adversarial = run_attack(pgd(net, 8 / 255, steps=2), images.detach(), labels)
    assert 0 < (adversarial - images).abs().max() <= 8 / 255 + 1e-6
    assert not net.training  # torchattacks put it back as it found it


def test_weights_of_the_shipped_checkpoint_load_when_resaved_without_lightning_keys(tmp_path, test_set):
    shipped = ClassifierModule.load_from_checkpoint(WEIGHTS, weights_only=True, map_location="cpu").eval()
    state = torch.load(WEIGHTS, weights_only=True)["state_dict"]
    torch.save({"state_dict": state}, tmp_path / "resaved.ckpt")  # was: KeyError 'pytorch-lightning_version'
    torch.save({key.removeprefix("net.model."): value for key, value in state.items()}, tmp_path / "bare.pt")
    for name in ("resaved.ckpt", "bare.pt"):
        model_file = read_model_file(tmp_path / name)
        assert model_file.format == STATE_DICT
        module = ClassifierModule()
        module.net.model = load_network(model_file, module.net.model)
        with torch.no_grad():
            torch.testing.assert_close(module.eval()(test_set[0][:32]), shipped(test_set[0][:32]))


def test_a_state_dict_of_another_network_names_the_first_mismatches(resnet, tmp_path):
    state = resnet.state_dict()
    del state["layer1.0.conv1.weight"]
    state["head.bias"] = torch.zeros(10)
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError) as error:
        load_network(read_model_file(tmp_path / "wrong.pt"), SmallResNet(width=8))
    assert (f"{tmp_path / 'wrong.pt'} holds weights of another network (missing layer1.0.conv1.weight; unexpected "
            f"head.bias; conv1.weight is (16, 3, 3, 3) in the file but (8, 3, 3, 3) in the model; ") in str(error.value)
    assert "more). Fix: set --model.network.class_path" in str(error.value)


def _truncated_safetensors(path: Path) -> None:
    save_file({"weight": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:-40])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
         "is not a readable checkpoint; it may be truncated, or be none of the formats read here"),
        (lambda path: path.write_bytes(b""), "is empty (0 bytes)"),
        (lambda path: torch.save([1, 2, 3], path), "holds no weights: it is a torch.save file of a list"),
        (lambda path: _truncated_safetensors(path), "is not a readable checkpoint; it may be truncated"),
        (lambda path: _script(SmallResNet(num_classes=7).eval()).save(path),
         "returns (1, 7) for a (1, 3, 32, 32) image, not (1, 10) logits"),
        (lambda path: torch.export.save(_export(SmallResNet().train()), path),
         "gives an image other logits in a batch than alone: it was saved in training mode"),
        (lambda path: torch.export.save(_export(SmallResNet().eval(), dynamic_batch=False), path),
         "fails on a batch of (N, 3, 32, 32) images"),
        (lambda path: torch.save({"weight": torch.tensor([float("nan")])}, path), "holds NaN or infinite weights (weight)"),
    ],
    ids=["no-format", "empty", "no-tensors", "truncated-safetensors", "7-logits", "exported-in-training-mode",
         "exported-for-one-batch-size", "nan"],
)
def test_a_file_that_cannot_work_is_refused_in_one_line(tmp_path, make, message):
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(CheckpointError) as error:
        read_model_file(path)
    assert str(path) in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value) and str(error.value).count("Fix:") == 1


@pytest.mark.parametrize("member", ["data/sample_inputs/model.pt", "data/constants/opaque_obj_0"])
def test_an_exported_program_that_would_run_code_is_refused_without_running_it(saved, tmp_path, member):
    """torch.export.load unpickles a .pt2's sample inputs with weights_only=False when weights only fail,
    and its opaque objects with pickle.loads."""
    marker, crafted = tmp_path / "pwned", tmp_path / "crafted.pt2"
    payload = io.BytesIO()
    torch.save({"payload": Payload(marker)}, payload)
    with zipfile.ZipFile(saved / "resnet.pt2") as original, zipfile.ZipFile(crafted, "w") as copy:
        root = original.namelist()[0].split("/")[0]
        for name in original.namelist():
            if name != f"{root}/{member}":
                copy.writestr(name, original.read(name))
        copy.writestr(f"{root}/{member}", payload.getvalue())
    with pytest.raises(CheckpointError, match="crafted.pt2: it holds Python objects that would run code"):
        read_model_file(crafted)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("normalization", "message"),
    [
        ({"mean": [0.5], "std": [0.5]}, "normalization.mean=[0.5] must hold 3 numbers, one per RGB channel"),
        ({"mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]}, "normalization.std=[0.5, 0.0, 0.5] must be finite and > 0"),
        ({"mean": [float("inf")] * 3, "std": [1.0] * 3}, "normalization.mean=[inf, inf, inf] must be finite"),
        ({"mu": [0.5] * 3, "std": [0.5] * 3}, "normalization has the keys ['mu', 'std'], not mean and std"),
    ],
)
def test_a_normalization_that_cannot_work_is_refused_naming_the_field(normalization, message):
    with pytest.raises(ValueError, match="Fix: --model.normalization") as error:
        ClassifierModule(normalization=normalization)
    assert message in str(error.value)


def test_normalization_null_feeds_the_pixels_as_they_are(test_set):
    network = ImprovedCNN().eval()
    module = ClassifierModule(network=network, normalization=None).eval()
    with torch.no_grad():
        torch.testing.assert_close(module(test_set[0][:4]), network(test_set[0][:4]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ckpt_path", "empty.pt"], "empty.pt is empty (0 bytes)"),
        (["--ckpt_path", "wrong.pt", "--model.network.class_path", RESNET, "--model.network.init_args.width", "8"],
         "wrong.pt holds weights of another network (conv1.weight is (16, 3, 3, 3) in the file but (8, 3, 3, 3)"),
        (["--ckpt_path", "resnet.safetensors", "--model.normalization", "{mean: [0.5], std: [0.5]}"],
         "invalid configuration: ClassifierModule: normalization.mean=[0.5] must hold 3 numbers"),
    ],
    ids=["empty", "another-network", "normalization-channels"],
)
def test_the_cli_refuses_a_model_file_that_cannot_work_in_one_line(capsys, cifar_slice, saved, monkeypatch, tmp_path,
                                                                   args, message):
    monkeypatch.chdir(tmp_path)
    Path("empty.pt").touch()
    Path("wrong.pt").write_bytes((saved / "state_dict.pt").read_bytes())
    Path("resnet.safetensors").write_bytes((saved / "resnet.safetensors").read_bytes())
    line = cli_error(capsys, "test", "--config", str(CONFIG), "--data.data_dir", str(cifar_slice), *args)
    assert message in line


def test_fit_refuses_a_program_and_says_what_to_do(capsys, cifar_slice, saved, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, "fit", "--config", str(CONFIG), "--data.data_dir", str(cifar_slice),
                     "--ckpt_path", str(saved / "torchscript.pt"))
    assert "fit trains --model.network, and" in line and "is a TorchScript file: a fixed program" in line
    assert "cifar-lightning test" in line


def test_the_study_runs_on_a_state_dict_and_on_a_torchscript_file(saved, test_set, reference, tmp_path):
    """Every stage of the study, on the first 128 test images, strong attacks on 32 of them, the checks and
    corruptions at their cheap settings (``conftest.small_subset``)."""
    def small_study(config):
        small_subset(config, eps_sweep=[], subset=32, pgd_steps=2, ensemble=["apgd-ce"])
        callback_args(config, "QuantizationEvaluation").update(calibration_images=128)

    config = write_config(tmp_path, small_study)
    data = write_slice(tmp_path / "data", n_train=128, n_test=128)
    accuracy = (reference[:128].argmax(1) == test_set[1][:128]).float().mean().item()
    for name, network in (("state_dict.pt", ["--model.network.class_path", RESNET]), ("torchscript.pt", [])):
        workdir = tmp_path / name
        workdir.mkdir()
        run_cli("test", "--config", str(config), "--data.data_dir", str(data), "--ckpt_path", str(saved / name),
                "--trainer.enable_progress_bar", "false", *network, cwd=workdir, env=IMPORTABLE)
        results = pd.read_csv(workdir / "lightning_logs" / "version_0" / "results.csv")
        [clean] = results[(results.model == "fp32") & (results.input == "clean")].acc
        assert clean == pytest.approx(accuracy, abs=1e-6)
        summary = (workdir / "lightning_logs" / "version_0" / "results.md").read_text()
        if name == "torchscript.pt":  # no Python modules to quantize: said once, and the study goes on
            assert set(results.model) == {"fp32"} and "Note: no int8 copies: a TorchScript program" in summary
        else:  # the residual network's int8 copies, attacked white-box through their surrogates
            assert {("int8_static", "whitebox"), ("int8_dynamic", "transfer")} <= set(zip(results.model, results.input))


def _predictions(workdir: Path, data_dir: Path, *args: str) -> pd.DataFrame:
    workdir.mkdir()
    run_cli("predict", "--config", str(CONFIG), "--data.data_dir", str(data_dir), "--trainer.enable_progress_bar",
            "false", *args, cwd=workdir, env=IMPORTABLE)
    return pd.read_csv(workdir / "lightning_logs" / "version_0" / "predictions.csv")


def test_predict_writes_each_test_image_once_as_the_model_predicts_it(cifar_slice, saved, test_set, reference,
                                                                      tmp_path):
    images, labels = test_set
    shipped = _predictions(tmp_path / "shipped", cifar_slice, "--ckpt_path", str(WEIGHTS))
    assert shipped["index"].tolist() == list(range(len(labels)))
    assert shipped["label"].tolist() == labels.tolist()
    assert shipped["predicted_class"].tolist() == [CLASSES[p] for p in shipped["predicted"]]
    assert shipped["confidence"].between(0.1, 1.0).all()  # the top of 10 probabilities
    module = ClassifierModule.load_from_checkpoint(WEIGHTS, weights_only=True, map_location="cpu").eval()
    with torch.no_grad():
        predicted = module(images).argmax(1)
    assert (shipped["predicted"] == shipped["label"]).mean() == pytest.approx((predicted == labels).float().mean().item())
    external = _predictions(tmp_path / "external", cifar_slice, "--ckpt_path", str(saved / "resnet.safetensors"),
                            "--model.network.class_path", RESNET)
    assert external["predicted"].tolist() == reference.argmax(1).tolist()
