"""attacks registry: get / make_attack, ATTACK_NAMES, register / unregister, option and target checks."""
import numpy as np
import pytest

from ibau_jax import attacks, errors

BUILTIN = ("badnets", "badnets_all2all", "blend", "trojan_sq", "trojan_wm", "l0_inv", "l2_inv", "sig", "wanet",
           "multi_trigger")


def test_builtin_names_and_aliases():
    assert attacks.ATTACK_NAMES == BUILTIN
    assert attacks.make_attack is attacks.get
    assert issubclass(attacks.AttackError, errors.UserError)


def test_unknown_attack_names_the_registered_ones():
    with pytest.raises(attacks.AttackError, match="unknown attack 'nope'; choose one of " + ", ".join(BUILTIN)):
        attacks.get("nope", num_classes=10)


def test_common_argument_checks():
    with pytest.raises(attacks.AttackError, match="target class 10 is outside 0..9; pass --target"):
        attacks.get("badnets", num_classes=10, target=10)
    with pytest.raises(attacks.AttackError, match="target class -1 is outside"):
        attacks.get("sig", num_classes=10, target=-1)
    with pytest.raises(attacks.AttackError, match="outside 0..9"):
        attacks.check_target(10, 10)
    assert attacks.check_target(np.int64(9), 10) == 9
    with pytest.raises(attacks.AttackError, match="num_classes must be at least 2"):
        attacks.get("badnets", num_classes=1)
    with pytest.raises(attacks.AttackError, match=r"image_shape must be \(H, W, C\)"):
        attacks.get("badnets", num_classes=10, image_shape=(32, 32))
    with pytest.raises(attacks.AttackError, match="no option.*strength.*its options: k, s, grid_rescale"):
        attacks.get("wanet", num_classes=10, strength=1)
    with pytest.raises(attacks.AttackError, match="'trojan_sq' has no option.*size; its options: none"):
        attacks.get("trojan_sq", num_classes=10, size=3)


def test_params_hold_every_option_with_defaults():
    assert attacks.get("badnets", num_classes=10).params == {"size": 4}
    assert attacks.get("sig", num_classes=10, freq=3.0).params == {"delta": 20.0 / 255.0, "freq": 3.0}
    assert attacks.get("blend", num_classes=10, seed=5).params == {"alpha": 0.2, "pattern_path": None, "seed": 5}


def _build_corner(spec, *, value=0.5):
    """A toy attack: pixel (0, 0) set to ``value``, all-to-one."""
    keep = np.ones(spec.image_shape, np.float32)
    keep[0, 0] = 0
    pattern = np.zeros(spec.image_shape, np.float32)
    pattern[0, 0] = value
    return spec.attack(keep=keep, pattern=pattern)


@pytest.fixture
def toy():
    attacks.register("corner", _build_corner)
    yield "corner"
    attacks.unregister("corner")
    assert attacks.ATTACK_NAMES == BUILTIN


def test_register_a_toy_attack_and_build_it(toy):
    assert attacks.ATTACK_NAMES == BUILTIN + ("corner",)
    a = attacks.get("corner", num_classes=5, target=3, image_shape=(8, 8, 1), value=0.25)
    assert isinstance(a, attacks.Attack)
    assert (a.name, a.target, a.num_classes, a.image_shape) == ("corner", 3, 5, (8, 8, 1))
    assert a.params == {"value": 0.25}
    x = np.random.default_rng(0).random((6, 8, 8, 1), dtype=np.float32)
    y = np.arange(6) % 5
    expect = x.copy()
    expect[:, 0, 0] = 0.25
    xt, lab, keep = attacks.asr_test_set(x, y, a)
    np.testing.assert_array_equal(xt, expect)
    np.testing.assert_array_equal(lab, np.full(6, 3))
    np.testing.assert_array_equal(keep, y != 3)
    ps = attacks.poison_dataset(x, y, a, 0.5, seed=0)
    assert len(ps.poisoned_idx) == 3 and np.all(ps.y[ps.poisoned_idx] == 3)
    with pytest.raises(attacks.AttackError, match="no option.*size; its options: value"):
        attacks.get("corner", num_classes=5, size=2)
    with pytest.raises(attacks.AttackError, match="choose one of .*multi_trigger, corner"):
        attacks.get("nope", num_classes=5)


def test_register_rejects_duplicates_and_bad_builders(toy):
    with pytest.raises(attacks.AttackError, match="'corner' is already registered; unregister"):
        attacks.register("corner", _build_corner)
    with pytest.raises(attacks.AttackError, match="must be an identifier"):
        attacks.register("my attack", _build_corner)
    with pytest.raises(attacks.AttackError, match="'size' must be keyword-only with a default"):
        attacks.register("bad", lambda spec, size: None)
    with pytest.raises(attacks.AttackError, match="AttackSpec as its first positional parameter"):
        attacks.register("bad", lambda *, size=1: None)
    with pytest.raises(attacks.AttackError, match="'nope' is not registered"):
        attacks.unregister("nope")
    assert "bad" not in attacks.ATTACK_NAMES
    attacks.register("bad", lambda spec: "not an attack")
    try:
        with pytest.raises(TypeError, match="returned str, not an Attack"):
            attacks.get("bad", num_classes=10)
    finally:
        attacks.unregister("bad")


def test_parse_options_types_values_like_the_defaults_and_names_bad_ones():
    assert attacks.option_defaults("sig") == {"delta": 20.0 / 255.0, "freq": 6.0}
    # strings from --attack-option KEY=VALUE, typed by each default; only the given keys come back
    assert attacks.parse_options("wanet", ["noise=false", "k=8", "s=1"]) == {"noise": False, "k": 8, "s": 1.0}
    assert attacks.parse_options("wanet", {"noise": True, "cross_ratio": 1}) == {"noise": True, "cross_ratio": 1.0}
    assert attacks.parse_options("sig", []) == {}
    for name, bad, words in [("sig", ["delta"], "expected KEY=VALUE"), ("sig", ["gain=2"], "no option 'gain'"),
                             ("sig", ["delta=abc"], "finite number"), ("sig", {"delta": float("nan")}, "finite number"),
                             ("wanet", {"k": 2.5}, "integer"), ("wanet", ["noise=maybe"], "true or false"),
                             ("nope", [], "unknown attack")]:
        with pytest.raises(attacks.AttackError, match=words):
            attacks.parse_options(name, bad)
    # the parsed options build the attack they describe
    a = attacks.get("sig", num_classes=10, target=0, **attacks.parse_options("sig", ["delta=0.25"]))
    assert a.params["delta"] == 0.25 and np.isclose(np.abs(a.pattern).max(), 0.25, atol=1e-3)
