"""Issue 15's round parameters through the real pipeline: train_data budgets, the KL anchor to
the lineage base, the real-text diversity numbers, and their validation at the API.

Rounds run in process (``run_round``) on real PostgreSQL with the tiny model; the API creates
nothing here but is asked for the 422s and for each round's recorded metrics.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from core.db import rounds as records
from core.db.session import Database, upgrade
from core.round_params import RoundParams
from core.settings import Settings
from worker.rounds.diversity_gate import Probe
from worker.rounds.pipeline import run_round

SMALL: dict[str, Any] = {
    "num_prompts": 4,
    "samples_per_prompt": 3,
    "max_new_tokens": 16,
    "min_words": 3,
    "train_size": 6,
    "valid_size": 3,
    "eval_passages": 6,
    "diversity_prompts": 3,
    "epochs": 1,
    "batch_size": 4,
    "max_length": 48,
    "filters": False,
    "promotion_margin": 0.9,  # rejected: the champion stays, so rounds are comparable
}


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory,
    pg_module_db_url: str,
    make_tiny_settings: Callable[..., Settings],
) -> Iterator[tuple[TestClient, Settings, Database]]:
    root = tmp_path_factory.mktemp("roundq")
    settings = make_tiny_settings(root, database_url=pg_module_db_url)
    upgrade(settings.database_url)
    with TestClient(create_app(settings)) as client:
        yield client, settings, Database(pg_module_db_url)


def _run(env: tuple[TestClient, Settings, Database], params: dict[str, Any]) -> dict[str, Any]:
    client, settings, db = env
    row = records.create_round(db, settings.lineage, RoundParams(**params).model_dump())
    run_round(settings, db, row.id)
    body: dict[str, Any] = client.get(f"/update-rounds/{row.id}").json()
    assert body["status"] == "succeeded", body["error"]
    return body


@pytest.mark.parametrize(
    "bad",
    [
        {"train_data": "synthetic_only"},
        {"kl_anchor": -0.1},
        {"kl_anchor": 101},
        {"kl_anchor": "lots"},
        {"kl_anchor_top_k": 0},
        {"kl_anchor_top_k": 4096},
        {"real_diversity_tolerance": -0.01},
        {"real_diversity_tolerance": 1.5},
        {"diversity_prompts": 0},
        {"train_passages": 0},
        {"train_passages": "few"},
        {"diversity_probe": "rotating"},
    ],
)
def test_out_of_range_quality_params_get_422(env: Any, bad: dict[str, Any]) -> None:
    client, _, _ = env
    before = client.get("/update-rounds").json()["total"]
    r = client.post("/update-rounds", json=bad)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation"
    assert next(iter(bad)) in r.json()["error"]
    assert client.get("/update-rounds").json()["total"] == before


@pytest.mark.parametrize("bad", ["maybe", 2, [True], {"on": True}, None])
def test_diversity_confirm_takes_a_boolean_only(env: Any, bad: Any) -> None:
    client, _, _ = env
    assert RoundParams().diversity_confirm is False  # the default: today's gate
    assert RoundParams(diversity_confirm=True).diversity_confirm is True
    before = client.get("/update-rounds").json()["total"]
    r = client.post("/update-rounds", json={"diversity_confirm": bad})
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation"
    # A known parameter with a wrong value (not an unknown one: extra fields are 422s too).
    assert "diversity_confirm" in r.json()["error"] and "valid boolean" in r.json()["error"]
    assert client.get("/update-rounds").json()["total"] == before


def test_each_train_data_mode_trains_on_its_own_budget(env: Any) -> None:
    upd = {m: _run(env, {**SMALL, "train_data": m})["metrics"]["update"] for m in
           ("mixed", "real_only", "real_only_matched")}  # fmt: skip
    mixed, real, matched = upd["mixed"], upd["real_only"], upd["real_only_matched"]
    # The same round in every mode (same champion, same seed): the same selection and replay.
    for k in ("selected_tokens", "prompt_tokens", "replay_tokens"):
        assert mixed[k] == real[k] == matched[k], k
    assert 0 < mixed["prompt_tokens"] < mixed["selected_tokens"]
    assert mixed["replay_tokens"] > 0
    # mixed: the selected samples plus the replay text.
    assert mixed["synthetic_tokens"] == mixed["selected_tokens"]
    assert mixed["real_tokens"] == mixed["replay_tokens"]
    # real_only: no generated text; as much real text as mixed had (replay + prompts).
    assert real["synthetic_tokens"] == 0
    assert real["real_tokens"] == mixed["replay_tokens"] + mixed["prompt_tokens"]
    assert real["real_token_fraction"] == 1.0
    # real_only_matched: no generated text; as many tokens as mixed trains on in all.
    assert matched["synthetic_tokens"] == 0
    assert matched["real_tokens"] == mixed["real_tokens"] + mixed["synthetic_tokens"]
    # What was trained follows the budgets (predicted tokens: one fewer than ids per row).
    assert real["tokens_trained"] < mixed["tokens_trained"] <= matched["tokens_trained"]


def test_train_passages_limits_the_prompts_and_real_text_to_a_fixed_pool(
    env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.rounds import stages, traindata
    from worker.rounds.data import load_corpus, passages, real_pool

    seen: dict[str, list[Any]] = {"prompts": [], "pools": [], "rows": []}
    round_prompts, build = stages.round_prompts, traindata.build_train_data

    def spy_prompts(*args: Any) -> list[str]:
        got = round_prompts(*args)
        seen["prompts"].append(got)
        return got

    def spy_build(mode: Any, pool: list[str], tok: Any, *rest: Any) -> Any:
        seen["pools"].append(list(pool))
        data = build(mode, pool, tok, *rest)
        seen["rows"].append([tok.decode(r, skip_special_tokens=True) for r in data.rows])
        return data

    monkeypatch.setattr(stages, "round_prompts", spy_prompts)
    monkeypatch.setattr(stages, "build_train_data", spy_build)
    pool = real_pool(load_corpus(None).train, 2)
    assert len(pool) == 2 and set(pool) <= set(passages(load_corpus(None).train))
    for seed in (1, 2):  # the same pool in every round, whatever the round's seed
        body = _run(env, {**SMALL, "seed": seed, "train_data": "real_only_matched",
                          "train_passages": 2})  # fmt: skip
        assert body["metrics"]["data"]["train_passages"] == 2
    assert seen["pools"] == [pool, pool]
    # Every prompt opens one of the two passages; every real row is cut from one of them
    # (rows are reused in further passes when the budget exceeds the pool).
    for prompts in seen["prompts"]:
        assert len(prompts) == SMALL["num_prompts"]
        assert all(any(p.startswith(x) for p in pool) for x in prompts)
    for rows in seen["rows"]:
        assert rows and all(any(r.strip()[:40] in p for p in pool) for r in rows)
    whole = _run(env, SMALL)["metrics"]["data"]
    assert whole["train_passages"] == len(passages(load_corpus(None).train)) > 100


def test_kl_anchor_loads_the_lineage_base_and_records_its_kl(env: Any) -> None:
    # Promote once (real text at a high rate), so the champion is no longer the base.
    better = {
        **SMALL,
        "replay_fraction": 0.8,
        "learning_rate": 3e-3,
        "epochs": 2,
        "promotion_margin": 0.0,
        "diversity_tolerance": 1.0,
        "base_diversity_tolerance": 1.0,
        "real_diversity_tolerance": 1.0,
    }
    first = _run(env, better)
    assert first["decision"] == "promoted", first["reason"]
    assert first["metrics"]["update"].get("anchor_kl") is None  # off by default
    hot = {**SMALL, "learning_rate": 3e-3, "epochs": 2, "replay_fraction": 0.5}
    # A negligible weight measures the KL without holding to the base: the control.
    free = _run(env, {**hot, "kl_anchor": 1e-9})["metrics"]["update"]
    held = _run(env, {**hot, "kl_anchor": 50.0})["metrics"]["update"]
    for m in (free, held):
        assert m["anchor_version"] == 1  # the lineage's v1, loaded from its files
        assert m["anchor_kl_start"] > 0  # the champion (v2) already differs from v1
        assert m["anchor_tokens"] == m["real_tokens"] - m["replay_texts"]
    assert held["anchor_kl_start"] == free["anchor_kl_start"]
    assert held["anchor_kl"] < free["anchor_kl"]  # the anchored update stays nearer the base
    assert free["train_loss"] != held["train_loss"]


def test_real_text_diversity_is_measured_once_and_recorded(env: Any) -> None:
    _, settings, _ = env
    ev = _run(env, SMALL)["metrics"]["evaluate"]
    assert 0 < ev["real_distinct_2"] <= 1 and 0 <= ev["real_repetition_rate"] < 1
    cache = Path(settings.checkpoint_dir, settings.lineage, "realtext.json")
    entries = json.loads(cache.read_text())
    assert len(entries) == 1  # one corpus, one probe size: promotions in between add none
    ev2 = _run(env, SMALL)["metrics"]["evaluate"]
    assert ev2["real_distinct_2"] == ev["real_distinct_2"]
    assert json.loads(cache.read_text()) == entries


def test_a_per_round_probe_measures_parent_and_base_on_the_rounds_own_prompts(env: Any) -> None:
    from worker.rounds.data import load_corpus
    from worker.rounds.diversity_gate import CACHE_FILE, Probe

    _, settings, _ = env
    cache = Path(settings.checkpoint_dir, settings.lineage, CACHE_FILE)

    def probe_key(round_seed: int | None) -> str:
        p = RoundParams(**SMALL)
        return Probe.from_train(
            load_corpus(None).train, p.diversity_prompts, p.max_new_tokens, p.temperature,
            p.top_p, p.generate_batch_size, round_seed=round_seed,
        ).key()  # fmt: skip

    def probes_in_cache() -> set[str]:
        return {k.split(":")[1] for k in json.loads(cache.read_text())} if cache.exists() else set()

    _run(env, {**SMALL, "seed": 11})
    fixed = probes_in_cache()
    assert probe_key(None) in fixed  # the default: one probe, whatever the seed
    for seed in (11, 12):
        body = _run(env, {**SMALL, "seed": seed, "diversity_probe": "per_round"})
        assert body["params"]["diversity_probe"] == "per_round"
        assert 0 <= body["metrics"]["evaluate"]["champion_distinct_2"] <= 1
        # The parent (and base) were measured again on this round's own probe.
        assert probe_key(seed) in probes_in_cache() - fixed
    assert len({probe_key(None), probe_key(11), probe_key(12)}) == 3


# Every tolerance wide open, a zero margin: an ε whose dev ppl does not get worse passes its
# probe (unless its repetition rises past the base check's absolute floor, which no tolerance
# opens) and goes on to the confirmation probe, which can still fail it there.
OPEN_GATE: dict[str, Any] = {
    **SMALL,
    "replay_fraction": 0.8,
    "learning_rate": 3e-3,
    "epochs": 2,
    "promotion_margin": 0.0,
    "diversity_tolerance": 1.0,
    "base_diversity_tolerance": 1.0,
    "real_diversity_tolerance": 1.0,
    "diversity_confirm": True,
}


def _probe(round_seed: int | None, confirm: bool = True) -> Probe:
    """The round's confirmation probe (or with ``confirm=False`` its main one) at SMALL's
    settings: the fixed one for None, else a per_round round's."""
    from worker.rounds.data import load_corpus

    p = RoundParams(**SMALL)
    return Probe.from_train(
        load_corpus(None).train, p.diversity_prompts, p.max_new_tokens, p.temperature,
        p.top_p, p.generate_batch_size, round_seed=round_seed, confirm=confirm,
    )  # fmt: skip


def _cached(settings: Settings, manifest: dict[str, Any], probe: Probe) -> dict[str, float] | None:
    from worker.rounds.diversity_gate import CACHE_FILE, weights_key

    path = Path(settings.checkpoint_dir, settings.lineage, CACHE_FILE)
    entries = json.loads(path.read_text()) if path.exists() else {}
    found: dict[str, float] | None = entries.get(f"{weights_key(manifest)}:{probe.key()}")
    return found


def _put(env: Any, who: str, probe: Probe, d2: float, rep: float) -> None:
    """Numbers for the champion's or the base's checkpoint on a probe, by hand."""
    from core import registry
    from worker.rounds.diversity_gate import DiversityCache
    from worker.rounds.textstats import DiversityStats

    _, settings, db = env
    ref = (registry.champion if who == "champion" else registry.lineage_root)(db, settings.lineage)
    assert ref is not None
    cache = DiversityCache(Path(settings.checkpoint_dir, settings.lineage))
    cache.put(ref.manifest, probe, DiversityStats(0.0, d2, rep))


def _open_main(env: Any, round_seed: int) -> None:
    """A per_round round's own main probe opened by hand (parent and base at distinct-2 0,
    repetition 1: with the tolerances at 1 nothing fails against them), so every ε with a dev
    gain reaches the confirmation whatever drift the rounds before left."""
    for who in ("champion", "base"):
        _put(env, who, _probe(round_seed, confirm=False), 0.0, 1.0)


def _confirmed_round(env: Any, params: dict[str, Any], probe: Probe) -> dict[str, Any]:
    """A round with ``diversity_confirm`` (confirmation ``probe``), checked: what it recorded
    for each ε, the parent's and base's numbers on the probe, and what the cache keeps."""
    from core import registry
    from worker.rounds.decide import DiversityCheck
    from worker.rounds.textstats import DiversityStats

    _, settings, db = env
    parent = registry.champion(db, settings.lineage)
    base = registry.lineage_root(db, settings.lineage)
    assert parent is not None and base is not None
    body = _run(env, params)
    assert body["params"]["diversity_confirm"] is True
    dec, ev = body["metrics"]["decide"], body["metrics"]["evaluate"]
    walked = [float(k.rsplit("_", 1)[1]) for k in dec if k.startswith("diversity_ok_eps_")]
    confirmed = {e: dec[f"confirm_ok_eps_{e:g}"] for e in walked if f"confirm_ok_eps_{e:g}" in dec}
    # Confirmed: each ε that passed its probe with a dev ppl no worse, and only those.
    gate = body["metrics"]["meta_step"]
    passed = [
        e
        for e in walked
        if dec[f"diversity_ok_eps_{e:g}"] and gate[f"gate_ppl_eps_{e:g}"] <= ev["champion_dev_ppl"]
    ]
    assert confirmed and sorted(confirmed) == sorted(passed), body["reason"]
    # Each confirmation's verdict follows from the recorded numbers alone.
    p = RoundParams(**body["params"])

    def at(who: str, suffix: str, where: dict[str, float] = dec) -> DiversityStats:
        d2, rep = where[f"{who}_distinct_2{suffix}"], where[f"{who}_repetition_rate{suffix}"]
        return DiversityStats(0.0, d2, rep)  # distinct-1 decides nothing

    for e, ok in confirmed.items():
        assert 0 < dec[f"candidate_distinct_2_confirm_eps_{e:g}"] <= 1
        assert 0 <= dec[f"candidate_repetition_rate_confirm_eps_{e:g}"] < 1
        again = DiversityCheck(
            parent=at("champion", "_confirm"),
            candidate=at("candidate", f"_confirm_eps_{e:g}"),
            tolerance=p.diversity_tolerance,
            base=at("base", "_confirm"),
            base_tolerance=p.base_diversity_tolerance,
            real=at("real", "", ev),
            real_tolerance=p.real_diversity_tolerance,
            probe_size=p.diversity_prompts,
        )
        assert ok == float(not again.failures()), e
    # One that failed there is named in the reason; the first to pass both is promoted.
    unconfirmed = {f"ε={e:g}" for e, ok in confirmed.items() if not ok}
    named = re.search(r"confirmation failed at ([^)]*)\)", body["reason"])
    assert set(named.group(1).split(", ") if named else []) == unconfirmed, body["reason"]
    assert (body["decision"] == "promoted") == (1.0 in confirmed.values()), body["reason"]
    # The parent and the base on the confirmation probe: in the cache under its key, and
    # recorded as the numbers the confirmation was held to.
    for who, ref in (("champion", parent), ("base", base)):
        stats = _cached(settings, ref.manifest, probe)
        assert stats is not None, who
        assert dec[f"{who}_distinct_2_confirm"] == stats["distinct_2"]
        assert dec[f"{who}_repetition_rate_confirm"] == stats["repetition_rate"]
    if body["decision"] == "promoted":  # its numbers on it are the next round's parent's
        eps = dec["epsilon"]
        assert confirmed[eps] == 1.0
        promoted = registry.champion(db, settings.lineage)
        assert promoted is not None and promoted.version == body["candidate_version"]
        got = _cached(settings, promoted.manifest, probe)
        assert got is not None
        assert got["distinct_2"] == dec[f"candidate_distinct_2_confirm_eps_{eps:g}"]
        assert got["repetition_rate"] == dec[f"candidate_repetition_rate_confirm_eps_{eps:g}"]
    return body


def test_a_confirmation_probe_measures_parent_and_base_on_its_own_prompts(env: Any) -> None:
    _, settings, _ = env
    fixed = _probe(None)
    off = _run(env, {**SMALL, "seed": 30})  # the default: no confirmation probe, none recorded
    assert off["params"]["diversity_confirm"] is False
    assert not [k for k in off["metrics"]["decide"] if "confirm" in k]
    cache = Path(settings.checkpoint_dir, settings.lineage, "diversity.json")
    assert not [k for k in json.loads(cache.read_text()) if k.endswith(f":{fixed.key()}")]

    first = _confirmed_round(env, {**OPEN_GATE, "seed": 31}, fixed)
    assert first["decision"] == "promoted", first["reason"]
    second = _confirmed_round(env, {**OPEN_GATE, "seed": 32}, fixed)
    # The second round's parent is the first's candidate: its confirmation numbers came from
    # the cache, and the base's are the ones measured once for the lineage.
    d1, d2 = first["metrics"]["decide"], second["metrics"]["decide"]
    eps1 = d1["epsilon"]
    assert d2["champion_distinct_2_confirm"] == d1[f"candidate_distinct_2_confirm_eps_{eps1:g}"]
    assert d2["base_distinct_2_confirm"] == d1["base_distinct_2_confirm"]
    assert d2["base_repetition_rate_confirm"] == d1["base_repetition_rate_confirm"]
    # per_round: the confirmation probe is the round's own too, not the fixed one.
    own = _probe(33)
    assert own.key() not in (fixed.key(), _probe(33, confirm=False).key())
    _open_main(env, 33)
    _confirmed_round(env, {**OPEN_GATE, "seed": 33, "diversity_probe": "per_round"}, own)


def test_an_eps_the_confirmation_probe_turns_down_is_not_promoted(env: Any) -> None:
    # A base no candidate can pass on round 34's own confirmation probe (its numbers there
    # put in the cache by hand: repetition -1): every ε that passes the round's probe is
    # turned down by the confirmation, held to those numbers, and the round is rejected.
    _open_main(env, 34)
    _put(env, "base", _probe(34), 0.5, -1.0)
    doomed = _confirmed_round(
        env, {**OPEN_GATE, "seed": 34, "diversity_probe": "per_round"}, _probe(34)
    )
    assert doomed["decision"] == "rejected", doomed["reason"]
    assert "confirmation failed at ε=" in doomed["reason"]
    assert doomed["metrics"]["decide"]["base_repetition_rate_confirm"] == -1.0
