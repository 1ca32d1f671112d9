"""Drop-in means opacus' own tests pass (issue 11, section 1b).

Opacus ships its test suite inside its wheel (``opacus/tests/``). The test files that build a
``PrivacyEngine`` are run here in a pytest subprocess with two helpers from ``tests/opacus_suite/`` on the
path: the plugin ``engine_swap.py`` (the conftest that replaces ``opacus.PrivacyEngine``,
``opacus.privacy_engine.PrivacyEngine`` and the name already bound in each collected test module with
``AdaptivePrivacyEngine`` when ``ADAPTIVE_DP_OPACUS_ENGINE=adaptive``) and a minimal ``torchvision``
stand-in (the real one cannot be loaded beside this CPU build of torch). Each test records the engine its
module saw, and every check below asserts that the swap really happened.

- ``test_fast_subset_passes_with_adaptive_engine`` (default run; about 20 s of CPU, one process): 18 tests
  chosen for coverage, at least one per file: σ = 0 comparisons with plain SGD, checkpoints, noise level,
  ε-targeted σ, determinism, model validation, gradient accumulation, the batch memory manager, seeds,
  accounting with AdaClip, schedulers. All of them pass with opacus' own engine (verified with
  ``ADAPTIVE_DP_OPACUS_ENGINE=opacus`` when the subset was chosen), so with ours they must pass too.
- ``test_same_outcomes_as_opacus_engine`` (``slow``: all 324 tests of ``FILES``, once per engine, ``-n 2``,
  hypothesis at opacus' 100 examples): every test that passes with opacus' engine passes with ours.
- ``test_standin_*``: the torchvision stand-in against torchvision's published facts (parameter counts,
  FakeData's seeding), so that the 45 tests that build ``resnet18`` / ``densenet121`` test what they mean to.

Left out: the files in ``LEFT_OUT`` (with the reason; ``test_engine_test_files_are_run_or_listed`` keeps
that list complete when opacus is upgraded). Opacus' test files that never mention ``PrivacyEngine``
(grad samplers, accountants, layers, validators, data loaders) test opacus' internals, which an engine
swap cannot change, and are not run. Within the files run, opacus itself skips a few tests (torchcsprng,
functorch-less expanded weights, the empty-batch class): they are skipped with both engines.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import opacus
import pytest
import torch

SUITE_DIR = Path(__file__).resolve().parent / "opacus_suite"
OPACUS_TESTS = Path(opacus.__file__).resolve().parent / "tests"
ENGINE_VARIABLE = "ADAPTIVE_DP_OPACUS_ENGINE"
ENGINE_NAMES = {
    "opacus": "opacus.privacy_engine.PrivacyEngine",
    "adaptive": "adaptive_dp.privacy_engine.AdaptivePrivacyEngine",
}

# Opacus' test files that construct a PrivacyEngine and run on a CPU (paths relative to opacus/tests).
FILES = (
    "privacy_engine_test.py",
    "privacy_engine_validation_test.py",
    "gradient_accumulation_test.py",
    "batch_memory_manager_test.py",
    "randomness_test.py",
    "accounting_noise_multiplier_test.py",
    "schedulers/noise_scheduler_test.py",
    "schedulers/grad_clip_scheduler_test.py",
)

# Opacus' test files that mention PrivacyEngine but are not run here, and why.
LEFT_OUT = {
    "mixed_precision_test.py": "CUDA only: opacus skips every test without a GPU, and this torch is a CPU build",
    "multigpu_adaptive_clipping_test.py": "needs >= 2 CUDA GPUs (opacus skips it otherwise)",
    "multigpu_gradcheck_test.py": "needs >= 2 CUDA GPUs (opacus skips it otherwise)",
    "multigpu_precision_test.py": "needs >= 2 CUDA GPUs (opacus skips it otherwise)",
    "ddp_hook_check.py": "a torch.distributed launch script, not a pytest file",
    "multigpu_fsdpcheck.py": "an FSDP launch script for CUDA GPUs, not a pytest file",
}

# The default run's subset (node ids relative to opacus/tests), run with hypothesis capped at 6 examples per
# property test (simplest first: sigma = 0, no clipping). Each passes with opacus' own engine (checked with
# ADAPTIVE_DP_OPACUS_ENGINE=opacus when chosen). The text model (embedding + DP attention) stands in for the
# conv net where the conv net is slow (noise level, checkpoints, epsilon target); same engine code paths.
FAST_SUBSET = (
    # sigma = 0 and clipping off: identical to plain SGD, step and closure; the engine must not refuse sigma = 0
    "privacy_engine_test.py::PrivacyEngineConvNetTest::test_compare_to_vanilla",
    # checkpoints restore model/accountant/schedulers and leave the optimizer's noise multiplier alone
    "privacy_engine_test.py::PrivacyEngineTextTest::test_checkpoints",
    # the added noise has std sigma * C / expected batch size
    "privacy_engine_test.py::PrivacyEngineTextTest::test_noise_level",
    # make_private_with_epsilon spends exactly the target epsilon
    "privacy_engine_test.py::PrivacyEngineTextTest::test_make_private_with_epsilon",
    "privacy_engine_test.py::PrivacyEngineTextTest::test_deterministic_run",
    # BatchNorm models are refused (torchvision resnet18 stand-in)
    "privacy_engine_test.py::PrivacyEngineConvNetTest::test_model_validator",
    "privacy_engine_validation_test.py::PrivacyEngineValidationTest::test_unsupported_hooks",
    "privacy_engine_validation_test.py::PrivacyEngineValidationTest::test_extra_param_hooks_requires_grad",
    # virtual steps: accumulated gradients equal one big batch, zero_grad semantics
    "gradient_accumulation_test.py::GradientAccumulationTest::test_privacy_engine_poisson_accumulation",
    "gradient_accumulation_test.py::GradientAccumulationTest::test_privacy_engine_no_poisson_accumulation",
    "gradient_accumulation_test.py::GradientAccumulationTest::test_privacy_engine_zero_grad",
    "batch_memory_manager_test.py::BatchMemoryManagerTest::test_equivalent_to_one_batch",
    # seeds: sigma = 0 runs depend only on the data loader's seed; noise draws follow the global seed
    "randomness_test.py::PrivacyEngineSecureModeTest::test_dl_seed_no_noise",
    "randomness_test.py::PrivacyEngineSecureModeTest::test_dl_seed_with_noise",
    "randomness_test.py::PrivacyEngineSecureModeTest::test_global_seed",
    # the accountant books the user's noise multiplier (AdaClip through the engine)
    "accounting_noise_multiplier_test.py::AdaClipNoiseMultiplierTest::test_privacy_accounting_with_adaclip_e2e",
    # opacus' noise / clipping schedulers drive the optimizer as with opacus' engine
    "schedulers/noise_scheduler_test.py::NoiseSchedulerTest::test_step_scheduler",
    "schedulers/grad_clip_scheduler_test.py::GradClipSchedulerTest::test_step_scheduler",
)
FAST_HYPOTHESIS_PROFILE = "opacus-suite-fast"  # registered by engine_swap


@dataclass(frozen=True)
class Outcome:
    """One opacus test's result: ``status`` passed/failed/skipped, the first line of its message, its engine."""

    status: str
    message: str
    engine: str


def run_opacus_tests(
    *,
    engine: str,
    targets: tuple[str, ...],
    workdir: Path,
    workers: int = 0,
    hypothesis_profile: str = "default",
    timeout_s: float,
) -> dict[str, Outcome]:
    """Run opacus' tests ``targets`` (files or node ids under opacus/tests) with ``engine`` in a subprocess.

    ``engine`` is ``"opacus"`` or ``"adaptive"``; ``workers > 0`` runs them with ``pytest -n workers``.
    Hypothesis draws from a fixed seed, so both engines see the same examples; ``hypothesis_profile`` is
    ``"default"`` (100 examples per property test, as opacus runs them) or ``FAST_HYPOTHESIS_PROFILE``.
    Returns node id -> Outcome.

    Raises:
        AssertionError: when pytest ends with anything but "all passed" / "some failed" (exit codes 0, 1).
    """
    report = workdir / f"junit-{engine}.xml"
    command = [sys.executable, "-m", "pytest", *(str(OPACUS_TESTS / target) for target in targets)]
    command += ["-c", str(SUITE_DIR / "pytest.ini"), "--rootdir", str(OPACUS_TESTS), "-q"]
    command += ["--hypothesis-seed=0", f"--hypothesis-profile={hypothesis_profile}", f"--junitxml={report}"]
    command += ["-n", str(workers)] if workers else ["-p", "no:xdist"]
    path = os.pathsep.join(filter(None, [str(SUITE_DIR), os.environ.get("PYTHONPATH")]))
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")
    }  # ours, not theirs
    env.update({ENGINE_VARIABLE: engine, "PYTHONPATH": path})
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode in (0, 1) and report.exists(), (
        f"pytest on opacus' tests ended with exit code {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return parse_junit(report)


def parse_junit(path: Path) -> dict[str, Outcome]:
    """Outcomes by node id (``file.py::Class::test``) from a pytest junit-xml report."""
    outcomes = {}
    for case in ET.parse(path).iter("testcase"):
        module, _, cls = case.get("classname", "").rpartition(".")
        node_id = f"{module.replace('.', '/')}.py::{cls}::{case.get('name')}"
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        results = [child for child in case if child.tag in ("failure", "error", "skipped")]
        failed = [child for child in results if child.tag != "skipped"]
        status = "failed" if failed else "skipped" if results else "passed"
        message = _first_line((failed or results)[0]) if results else ""
        outcomes[node_id] = Outcome(status=status, message=message, engine=properties.get("engine", "none"))
    return outcomes


def _first_line(result: ET.Element) -> str:
    lines = (result.get("message") or result.text or "").strip().splitlines()
    return lines[0] if lines else ""


def failures_by_cause(outcomes: dict[str, Outcome], node_ids) -> str:
    """The failed ``node_ids`` grouped by the first line of their error, for an assertion message."""
    groups = defaultdict(list)
    for node_id in node_ids:
        groups[outcomes[node_id].message].append(node_id)
    lines = []
    for message, nodes in sorted(groups.items(), key=lambda item: -len(item[1])):
        lines += [f"{len(nodes)} x {message}", *(f"    {node}" for node in sorted(nodes))]
    return "\n".join(lines)


def _assert_engine_used(outcomes: dict[str, Outcome], engine: str) -> None:
    """Every test that ran (was not skipped) saw ``engine``'s class as its module's ``PrivacyEngine``."""
    ran = {node: o.engine for node, o in outcomes.items() if o.status != "skipped"}
    wrong = {node: seen for node, seen in ran.items() if seen != ENGINE_NAMES[engine]}
    assert ran and not wrong, f"these tests did not run with {ENGINE_NAMES[engine]}: {wrong}"


def assert_same_outcomes(*, reference: dict[str, Outcome], ours: dict[str, Outcome]) -> None:
    """Every test of ``FILES`` that passes with opacus' engine (``reference``) passes with ours.

    Raises:
        AssertionError: naming the regressions grouped by the first line of their error; also when the two
            runs collected different tests, a run did not use its engine, or a file has no passing test.
    """
    assert set(ours) == set(reference), f"collected differently: {set(ours) ^ set(reference)}"
    _assert_engine_used(reference, "opacus")
    _assert_engine_used(ours, "adaptive")
    passing = {node.split("::")[0] for node, outcome in reference.items() if outcome.status == "passed"}
    assert passing == set(FILES), f"no test passes with opacus' own engine in {set(FILES) - passing}"
    regressions = [n for n, o in reference.items() if o.status == "passed" and ours[n].status != "passed"]
    assert not regressions, (
        f"{len(regressions)} of opacus' tests pass with opacus' engine but not with AdaptivePrivacyEngine:\n"
        + failures_by_cause(ours, regressions)
    )


@pytest.fixture(scope="module")
def standin():
    """The torchvision stand-in, imported under a private name so that ``torchvision`` stays unimportable here."""
    package = SUITE_DIR / "torchvision"
    spec = importlib.util.spec_from_file_location(
        "_torchvision_standin", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_standin_models_have_torchvision_architectures(standin):
    # torchvision's model cards: resnet18 has 11 689 512 parameters, densenet121 7 978 856; BatchNorm layers:
    # 1 + 8 blocks x 2 + 3 shortcuts = 20, and 1 + 58 dense layers x 2 + 3 transitions + 1 = 121.
    resnet, densenet = standin.models.resnet18(), standin.models.densenet121(weights=None)
    assert sum(p.numel() for p in resnet.parameters()) == 11_689_512
    assert sum(p.numel() for p in densenet.parameters()) == 7_978_856
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in resnet.modules()) == 20
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in densenet.modules()) == 121
    assert densenet.classifier.in_features == 1024
    assert resnet(torch.zeros(2, 3, 32, 32)).shape == (2, 1000)
    with pytest.raises(ValueError, match="weights=None"):
        standin.models.resnet18(weights="IMAGENET1K_V1")


def test_standin_fake_data_follows_torchvision(standin):
    transforms = standin.transforms
    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.25,))])
    data = standin.datasets.FakeData(size=3, image_size=(1, 5, 7), num_classes=4, transform=to_input)
    state = torch.get_rng_state()
    image, label = data[2]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    torch.manual_seed(2)  # torchvision: example i is drawn from seed i, noise -> uint8 image -> [0, 1]
    expected = (torch.randn(1, 5, 7).mul(255).byte().float() / 255 - 0.5) / 0.25
    torch.set_rng_state(state)
    assert torch.allclose(image, expected) and isinstance(label, int) and 0 <= label < 4
    assert torch.equal(data[2][0], image)
    rgb = standin.datasets.FakeData(size=1, image_size=(3, 4, 6), transform=transforms.ToTensor())
    assert rgb[0][0].shape == (3, 4, 6)
    with pytest.raises(IndexError):
        data[3]


def test_engine_test_files_are_run_or_listed():
    mentioning = {
        path.relative_to(OPACUS_TESTS).as_posix()
        for path in OPACUS_TESTS.rglob("*.py")
        if "PrivacyEngine" in path.read_text(encoding="utf-8")
    }
    assert mentioning == set(FILES) | set(LEFT_OUT)
    assert {node.split("::")[0] for node in FAST_SUBSET} == set(FILES)


def test_fast_subset_passes_with_adaptive_engine(tmp_path):
    outcomes = run_opacus_tests(
        engine="adaptive",
        targets=FAST_SUBSET,
        workdir=tmp_path,
        hypothesis_profile=FAST_HYPOTHESIS_PROFILE,
        timeout_s=900,
    )
    assert set(outcomes) == set(FAST_SUBSET)
    _assert_engine_used(outcomes, "adaptive")
    failed = [node for node, outcome in outcomes.items() if outcome.status != "passed"]
    assert not failed, "opacus' tests failing with AdaptivePrivacyEngine:\n" + failures_by_cause(
        outcomes, failed
    )


@pytest.mark.slow
def test_same_outcomes_as_opacus_engine(tmp_path):
    reference = run_opacus_tests(engine="opacus", targets=FILES, workdir=tmp_path, workers=2, timeout_s=7200)
    ours = run_opacus_tests(engine="adaptive", targets=FILES, workdir=tmp_path, workers=2, timeout_s=7200)
    assert_same_outcomes(reference=reference, ours=ours)
