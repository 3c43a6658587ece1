"""Open registries: a package of one's own plugs in attacks and judges through entry points, the
built-ins and the toy world register the same way, and the core stays free of pytest and of the toy world."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

from pytest_unlearnatk import UnlearnAtkError, load_cases
from pytest_unlearnatk.attacks import SettingError, configure_attack, get_attack
from pytest_unlearnatk.registry import Entry, Registry, discover

pytest_plugins = ["pytester"]

PACKAGE = Path(__file__).resolve().parents[1] / "pytest_unlearnatk"
# the pytest adapter (and the package's lazy `unlearn_attack`, the marker re-exported); every
# other module is the core and must work without pytest
ADAPTER = {"plugin.py", "suite.py", "terminal.py", "__init__.py"}

# A third-party package, as docs/architecture.md shows it: one attack, one judge, one prompt set.
PLUGIN_MODULE = '''
from dataclasses import dataclass

import numpy as np

from pytest_unlearnatk import AttackOutcome, CaseByCase, Verdict


@dataclass(frozen=True)
class SweepConfig:
    tries: int = 3  # candidates per case: token ids first_id, first_id + 1, ...
    first_id: int = 1000


class TokenSweep(CaseByCase):
    """Prepends one token, trying consecutive ids: a deliberately simple attack."""

    name = "token_sweep"
    config_class = SweepConfig
    presets = {"smoke": SweepConfig(tries=2), "fast": SweepConfig(tries=3)}
    default_preset = "fast"
    requires = ("torch",)
    needs_target = False
    n_adversarial = 1

    def __init__(self, config):
        self.config = config

    def config_dict(self):
        return {"tries": self.config.tries, "first_id": self.config.first_id}

    def run(self, case, prompt, context):
        outcome = AttackOutcome()
        for token in range(self.config.first_id, self.config.first_id + self.config.tries):
            verdict, image = context.check(context.layout.sequence(prompt.content_ids, [token]))
            outcome.adversarial_ids, outcome.verdict, outcome.image = [token], verdict, image
            if verdict.hit:
                outcome.hit = True
                break
        return outcome


class BrightnessJudge:
    """Hit when the image's mean brightness (0..1) is above ``threshold``."""

    name = "brightness"
    requires = ("numpy",)

    def __init__(self, threshold=0.5):
        self.threshold = float(threshold)
        self.settings = {"threshold": self.threshold}

    def __call__(self, images):
        means = [float(np.asarray(image.convert("L")).mean() / 255) for image in images]
        return [Verdict(hit=mean > self.threshold, score=mean) for mean in means]


def shapes():
    return ["a red square", {"prompt": "a blue circle", "seed": 3}]
'''

ENTRY_POINTS = '''
[pytest_unlearnatk.attacks]
token_sweep = sweep_plugin:TokenSweep

[pytest_unlearnatk.judges]
brightness = sweep_plugin:BrightnessJudge
'''


def make_distribution(where: Path) -> Path:
    """A throwaway installed distribution: its module and its ``.dist-info`` with entry points."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "sweep_plugin.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    info = where / "sweep_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sweep-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return where


def test_a_package_on_sys_path_adds_an_attack_and_a_judge_used_from_a_marker(pytester, tiny_dir):
    """The worked example of docs/architecture.md, run end to end."""
    pytester.syspathinsert(make_distribution(pytester.path / "site"))
    pytester.makepyfile(test_own_plugins='''
        import pytest

        @pytest.mark.unlearn_attack(concept="redness", prompts=["a red square", "a blue circle"], max_asr=0.0,
                                    attack="token_sweep", budget="smoke", judge={"name": "brightness", "threshold": 2.0})
        def test_resists(unlearn_result):
            assert unlearn_result.attack == "token_sweep"
            assert [case.renders for case in unlearn_result.cases] == [3, 3]  # plain prompt + 2 tries (smoke)
            assert [case.adversarial_ids for case in unlearn_result.cases] == [[1001], [1001]]

        @pytest.mark.unlearn_attack(concept="redness", prompts="sweep_plugin:shapes", max_asr=0.5,
                                    attack="token_sweep", judge={"name": "brightness", "threshold": -1.0})
        def test_breaks():
            pass
    ''')
    result = pytester.runpytest(f"--unlearn-model={tiny_dir}", "--unlearn-no-store", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([("*unlearn gate 'test_own_plugins.py::test_breaks' failed: ASR 100.0% > max_asr 50.0%*"
                                  "attack token_sweep, budget fast)")])

    listed = pytester.runpytest("--unlearn-list")
    assert listed.ret == 0
    listed.stdout.fnmatch_lines([
        "attacks (entry points pytest_unlearnatk.attacks):",
        "*token_sweep  ?sweep-plugin 0.1: sweep_plugin:TokenSweep?",
        "*budgets: smoke, fast (default)", "*settings: tries, first_id", "*imports when used: torch",
        "*brightness  ?sweep-plugin 0.1: sweep_plugin:BrightnessJudge?",
        "*toy  ?pytest-unlearnatk *: pytest_unlearnatk.toy:MODEL_SOURCE?", "*toy:erased: *",
    ])


def test_a_wrong_setting_or_budget_for_a_plug_in_attack_fails_at_collection(pytester):
    pytester.syspathinsert(make_distribution(pytester.path / "site"))
    pytester.makefile(".yaml", unlearn_bad='''
        gates:
          - {concept: redness, prompts: [a red square], max_asr: 0.1, attack: token_sweep, budget: reference,
             judge: brightness}
    ''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*gates?0?: 'budget' is 'reference'; use one of smoke, fast*"])
    pytester.makefile(".yaml", unlearn_bad="gates:\n  - {concept: circle, prompts: [a], max_asr: 0.1, attack: no_attack, n_tokens: 3}\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*gates?0?: 'n_tokens' is not a setting of this attack; its settings: none*"])


def test_an_attack_says_which_settings_and_budgets_it_takes():
    no_attack = discover().attacks.get("no_attack")
    with pytest.raises(SettingError, match="'no_attack': n_tokens is not a setting of this attack; its settings: none"):
        configure_attack(no_attack, n_tokens=3)
    with pytest.raises(SettingError, match="no budget presets; drop it"):
        configure_attack(no_attack, "fast")
    with pytest.raises(SettingError, match="budget is 'huge'; use one of reference, fast, smoke"):
        get_attack("random", "huge")
    random_fast = get_attack("random", "fast", n_tokens=3)
    assert (random_fast.config.tries, random_fast.n_adversarial) == (10, 3)
    assert get_attack("unlearndiffatk").config.num_timesteps == 50  # the default preset: reference


def test_module_callable_names_a_prompt_set_and_a_model_source(tmp_path, monkeypatch, tiny_dir):
    (tmp_path / "my_sets.py").write_text(
        "from pytest_unlearnatk import ModelRef\n"
        "def prompts():\n    return ['a cat', {'prompt': 'a dog', 'seed': 4}]\n"
        f"def model():\n    return ModelRef({str(tiny_dir)!r})\n"
        "def broken():\n    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = load_cases("my_sets:prompts")
    assert [(c.prompt, c.seed) for c in cases] == [("a cat", 0), ("a dog", 4)]
    from pytest_unlearnatk.models import model_fingerprint, resolve_model

    assert resolve_model("my_sets:model", None) == (str(tiny_dir), None)
    assert model_fingerprint("my_sets:model") == model_fingerprint(tiny_dir)
    with pytest.raises(UnlearnAtkError, match="prompt set 'my_sets:broken' gave a int"):
        load_cases("my_sets:broken")
    with pytest.raises(UnlearnAtkError, match="could not import 'my_sets:missing'"):
        load_cases("my_sets:missing")
    with pytest.raises(UnlearnAtkError, match="unknown model source 'toy:nothing'; toy: has toy:base, toy:erased"):
        resolve_model("toy:nothing", None)


def test_two_packages_claiming_one_name_is_an_error_naming_both():
    entry = Entry("attack", "sweep", "a:B", "pkg-a 1.0")
    registry = Registry("attack", {"sweep": entry}, conflicts={"sweep": ("pkg-a 1.0", "pkg-b 2.0")})
    with pytest.raises(UnlearnAtkError, match=r"registered by several packages \(pkg-a 1.0, pkg-b 2.0\)"):
        registry.get("sweep")
    with pytest.raises(UnlearnAtkError, match="unknown attack 'other'; registered attacks: sweep"):
        registry.get("other")


def test_the_builtins_and_the_toy_world_register_through_entry_points():
    registries = discover()
    assert {"unlearndiffatk", "random", "no_attack", "p4d-n", "p4d-k", "ring-a-bell", "concept-inversion"} <= set(registries.attacks.names())
    assert {"nudenet", "imagenet", "hf_classifier", "clip", "toy_circle"} <= set(registries.judges.names())
    assert registries.model_sources.entries["toy"].reference == "pytest_unlearnatk.toy:MODEL_SOURCE"
    assert "toy" in registries.prompt_sets and {"builtin", "toy"} <= set(registries.concepts.names())


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against the package)."""
    package = ["pytest_unlearnatk", *path.relative_to(PACKAGE).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return found


def test_core_modules_import_neither_pytest_nor_the_plugin_nor_the_toy_world():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("toy/"):
            continue
        imports = _imports(path)
        assert not {m for m in imports if m.startswith("pytest_unlearnatk.toy")}, f"{relative} imports the toy world"
        if relative not in ADAPTER:
            assert not {m for m in imports if m == "pytest" or m.startswith(("_pytest", "pytest_unlearnatk.plugin"))}, \
                f"{relative} is core but imports pytest or the plugin"


def test_the_toy_world_uses_only_the_public_api():
    import pytest_unlearnatk

    public = {f"pytest_unlearnatk.{name}" for name in pytest_unlearnatk.__all__}
    for path in sorted((PACKAGE / "toy").glob("*.py")):
        outside = {m for m in _imports(path)
                   if m.startswith("pytest_unlearnatk.") and not m.startswith("pytest_unlearnatk.toy") and m not in public}
        assert not outside, f"toy/{path.name} reaches into {sorted(outside)}; use `from pytest_unlearnatk import ...`"
