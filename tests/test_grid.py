"""Member grids: the study's expansion order, seeds, ids and names; profiles; malformed files."""

import itertools
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import SWEEPS
from nanosweep.cli.main import main
from nanosweep.study.grid import GridError, default_sweeps_dir, expand, load_member, load_members

MEMBERS = {  # block_size, n_layer, global id offset
    "shallow_small": (64, 4, 0),
    "deep_small": (64, 6, 32),
    "shallow_large": (128, 4, 64),
    "deep_large": (128, 6, 96),
}


@pytest.mark.parametrize("member", MEMBERS)
def test_expansion_order_seeds_ids_and_names_match_the_study(member):
    block, layers, offset = MEMBERS[member]
    [spec] = load_members(SWEEPS, member)
    points = expand(spec, "full")
    # REFERENCE: n_head, n_embd, batch_size, max_iters, dropout, the last varying fastest
    grid = itertools.product([4, 8], [128, 256], [8, 16], [1000, 2000], [0.1, 0.2])
    expected = [
        f"b{block}_L{layers}_H{h}_E{e}_BS{bs}_MI{mi}_D{round(d * 100)}_s{i + 1}"
        for i, (h, e, bs, mi, d) in enumerate(grid)
    ]
    assert [p.config.run_name for p in points] == expected
    assert [p.position for p in points] == [p.config.seed for p in points] == list(range(1, 33))
    assert [p.global_id for p in points] == list(range(offset + 1, offset + 33))
    cfg = points[0].config
    recipe = (cfg.learning_rate, cfg.warmup_iters, cfg.gradient_accumulation_steps, cfg.eval_interval)
    assert recipe == (3e-4, 2000, 40, 200)


def test_reference_names():
    [shallow_small] = load_members(SWEEPS, "shallow_small")
    names = [p.config.run_name for p in expand(shallow_small, "full")]
    assert names[:2] == ["b64_L4_H4_E128_BS8_MI1000_D10_s1", "b64_L4_H4_E128_BS8_MI1000_D20_s2"]
    [deep_large] = load_members(SWEEPS, "deep_large")
    assert expand(deep_large, "full")[-1].config.run_name == "b128_L6_H8_E256_BS16_MI2000_D20_s32"


def test_all_means_every_member_in_global_id_order():
    members = load_members(SWEEPS, "all")
    assert [m.name for m in members] == list(MEMBERS)
    ids = [p.global_id for m in members for p in expand(m, "full")]
    assert ids == list(range(1, 129))


def test_quick_profile_keeps_the_grid_and_names_the_iterations_it_trains():
    [spec] = load_members(SWEEPS, "shallow_small")
    full, quick = expand(spec, "full"), expand(spec, "quick")
    for f, q in zip(full, quick, strict=True):
        assert (q.config.n_head, q.config.n_embd, q.config.batch_size, q.config.dropout, q.config.seed) == (
            f.config.n_head,
            f.config.n_embd,
            f.config.batch_size,
            f.config.dropout,
            f.config.seed,
        )
        assert q.config.max_iters == f.config.max_iters // 20
        assert f"_MI{q.config.max_iters}_" in q.config.run_name
        assert q.config.config_hash != f.config.config_hash
    assert quick[0].config.run_name == "b64_L4_H4_E128_BS8_MI50_D10_s1"
    # the quick run sits where the study's did in its schedule: still in warmup at the end
    assert quick[-1].config.max_iters <= quick[-1].config.warmup_iters


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("grid: {n_head: [4]}\nsurprise: 1\n", "unknown key 'surprise'"),
        ("grid: {n_head: 4}\n", "key 'grid.n_head' must be a non-empty list, got 4"),
        ("grid: {n_heads: [4]}\n", "key 'grid.n_heads' is not a TrainConfig field"),
        ("fixed: {block_size: 64}\n", "key 'grid' is missing or empty"),
        ("grid: {n_head: [4]\n", "not valid YAML"),
        ("global_id_offset: -1\ngrid: {n_head: [4]}\n", "key 'global_id_offset' must be an integer >= 0, got -1"),
        ("grid: {n_head: [4], seed: [1, 2]}\n", "key 'seed' is not allowed"),
        ("repeats: 0\ngrid: {n_head: [4]}\n", "key 'repeats' must be an integer >= 1 (seeds per grid point), got 0"),
        ("repeats: two\ngrid: {n_head: [4]}\n", "key 'repeats' must be an integer >= 1"),
        ("grid: {n_head: [2, 4, 2]}\n", "key 'grid.n_head' lists 2 twice: give each value once"),
        ("grid: {n_head: [4]}\ngrid: {n_head: [8]}\n", "not valid YAML (key 'grid' is given twice, line 2)"),
        ("fixed: {n_layer: 2, n_layer: 4}\ngrid: {n_head: [4]}\n", "not valid YAML (key 'n_layer' is given twice"),
    ],
)
def test_malformed_member_files_name_the_file_and_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(GridError) as error:
        load_member(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_a_member_file_that_is_not_utf8_is_refused_naming_the_line_of_the_first_bad_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("grid: {n_head: [4]}\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(GridError) as error:
        load_member(path)
    assert str(error.value) == f"{path}: line 2 holds byte 0xe9, which is not UTF-8: save the file as UTF-8"


def test_numbers_with_an_exponent_are_numbers_and_integers_stay_integers(tmp_path):
    path = write(tmp_path, "grid: {n_head: [4]}\noverrides: {learning_rate: 1e-4, min_lr: 6E-5}\n")
    [point] = expand(load_member(path), "full")
    assert (point.config.learning_rate, point.config.min_lr) == (1e-4, 6e-5)  # PyYAML alone reads strings
    path = write(tmp_path, "grid: {n_head: [4]}\noverrides: {warmup_iters: 2.5}\n")
    with pytest.raises(GridError, match=r"grid point 1 \{'n_head': 4\}: warmup_iters=2.5 is not allowed: it must"):
        expand(load_member(path), "full")


def test_a_grid_point_that_fails_validation_is_named_before_anything_runs(tmp_path):
    path = write(tmp_path, "fixed: {n_layer: 2}\ngrid: {n_head: [4, 3], n_embd: [64]}\n")
    with pytest.raises(GridError) as error:
        expand(load_member(path), "full")
    assert str(error.value) == (
        f"{path}: grid point 2 {{'n_head': 3, 'n_embd': 64}}: n_embd=64 is not divisible by n_head=3: "
        "each head gets n_embd/n_head channels"
    )


def test_unknown_member_and_profile_list_the_valid_ones(tmp_path):
    with pytest.raises(
        GridError,
        match=r"member='nope' is unknown: choose one of shallow_small, deep_small, "
        r"shallow_large, deep_large or all",
    ):
        load_members(SWEEPS, "nope")
    [spec] = load_members(SWEEPS, "deep_large")
    with pytest.raises(GridError, match=r"profile='slow' is unknown: choose one of full, quick"):
        expand(spec, "slow")


def test_repeats_put_every_seed_of_a_point_side_by_side_with_distinct_seeds_and_the_points_global_id():
    [spec] = load_members(SWEEPS, "shallow_small")
    once, thrice = expand(spec, "quick"), expand(spec, "quick", repeats=3)
    assert len(thrice) == 96 and [p for p in thrice if p.replicate == 1] == once  # replicate 1 is the study's run
    first = thrice[:3]
    assert [p.config.run_name for p in first] == [f"b64_L4_H4_E128_BS8_MI50_D10_s{s}" for s in (1, 1001, 2001)]
    assert [(p.position, p.global_id, p.replicate) for p in first] == [(1, 1, 1), (1, 1, 2), (1, 1, 3)]
    assert first[1].study_tags()["replicate"] == "2" and first[1].study_tags()["global_id"] == "1"
    assert len({p.config.seed for p in thrice}) == len({p.config.config_hash for p in thrice}) == 96
    # replicates differ by seed alone: what fused training groups by
    assert {p.config.replace(seed=0) for p in first} == {first[0].config.replace(seed=0)}


def test_repeats_below_one_or_on_a_grid_too_large_for_distinct_seeds_are_refused(tmp_path):
    [spec] = load_members(SWEEPS, "shallow_small")
    with pytest.raises(GridError, match=r"^repeats=0 is not allowed: it must be >= 1"):
        expand(spec, "full", repeats=0)
    levels = ", ".join(str(i) for i in range(1, 1001))
    path = write(tmp_path, f"grid: {{max_iters: [{levels}]}}\n")
    expand(load_member(path), "full")  # one seed per point: any size
    with pytest.raises(GridError, match=r"1000 grid points with repeats=2: .* fewer than 1000 points"):
        expand(load_member(path), "full", repeats=2)


def test_more_than_a_hundred_thousand_runs_are_refused_before_anything_is_expanded(tmp_path):
    [spec] = load_members(SWEEPS, "shallow_small")
    with pytest.raises(GridError, match=r"32 grid point\(s\) x repeats=3126 is 100,032 runs: .* at most 100,000$"):
        expand(spec, "quick", repeats=3126)
    levels = ", ".join(str(i) for i in range(1, 401))
    path = write(tmp_path, f"grid: {{max_iters: [{levels}], top_k: [{levels}]}}\n")
    with pytest.raises(GridError, match=r"160000 grid point\(s\) x repeats=1 is 160,000 runs"):
        expand(load_member(path), "full")


def test_two_member_files_with_one_member_name_are_refused_naming_both(tmp_path, monkeypatch):
    first, second = tmp_path / "tiny.yaml", tmp_path / "tiny_copy.yaml"
    first.write_text("member: tiny\ngrid: {n_head: [4]}\n")
    second.write_text("member: tiny\ngrid: {n_head: [2]}\n")  # a copy renamed, its member name kept
    message = f"member name 'tiny' is used by {first} and {second}: give each member file its own `member:` name"
    for name in ("tiny", "all"):
        with pytest.raises(GridError) as error:
            load_members(tmp_path, name)
        assert str(error.value) == message
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["sweep", "--member", "tiny", "--sweeps-dir", str(tmp_path), "--dry-run"])
    assert (result.exit_code, result.output) == (1, f"Error: {message}\n")


def test_outside_a_checkout_the_default_sweeps_dir_is_this_checkouts_with_the_four_members(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOSWEEP_SWEEPS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./sweeps here
    assert default_sweeps_dir() == SWEEPS.resolve()
    assert {m.name for m in load_members(default_sweeps_dir(), "all")} >= {"shallow_small", "deep_large"}
