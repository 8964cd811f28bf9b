"""V-IRL text navigation: route consistency, the two action spaces, verifier, splits, episodes."""

from __future__ import annotations

import json
import random
import re

import pytest

from amft_cli.config import TaskConfig
from amft_cli.tasks import virl
from amft_cli.tasks.virl import COMPASS, FORWARD, STOP, turn_action


def _cfg(fmt="compact", seed=7, train=300, val=40, test=60, ood=60, pretrain=0):
    return TaskConfig(name="virl", format=fmt, seed=seed, train_size=train,
                      val_size=val, test_size=test, ood_size=ood, pretrain_size=pretrain)


@pytest.fixture(scope="module")
def compact():
    return virl.build_splits(_cfg("compact"))


@pytest.fixture(scope="module")
def full():
    return virl.build_splits(_cfg("full"))


def _routes(rule, n=200, seed=0):
    rng = random.Random(seed)
    return [virl.make_route(rng, rule) for _ in range(n)]


def _worst_route():
    """4 legs of 3 blocks with two-letter compass codes: the longest compact prompt."""
    legs, landmarks = [], []
    pos, names = (0, 0), ["Museum of Art", "Public Library", "Museum of Art", "Public Library"]
    for direction, name in zip(("northeast", "northwest", "northeast", "northwest"), names):
        dx, dy = virl.STEP_VECTORS[COMPASS.index(direction)]
        pos = (pos[0] + 3 * dx, pos[1] + 3 * dy)
        legs.append({"direction": direction, "landmark": name, "side": "left", "blocks": 3})
        landmarks.append([*pos, name, "west"])
    actions = []
    for leg in legs:
        actions += [turn_action(leg["direction"])] + [FORWARD] * 3
    return {"rule": "id", "start": [0, 0], "heading": "north", "legs": legs,
            "landmarks": landmarks, "actions": actions + [STOP]}


# ---------------------------------------------------------------------------
# the world


def test_walk_by_hand():
    route = {"start": [5, 5], "heading": "north", "landmarks": []}
    actions = [turn_action("east"), FORWARD, FORWARD, turn_action("slightly left"), FORWARD, STOP]
    states = virl.walk(route, actions)
    assert [s[0] for s in states] == [(5, 5), (5, 5), (6, 5), (7, 5), (7, 5), (8, 6), (8, 6)]
    assert [COMPASS[s[1]] for s in states][-1] == "northeast"


@pytest.mark.parametrize("rule", ["id", "ood"])
def test_replaying_the_gold_actions_walks_the_route(rule):
    for route in _routes(rule):
        actions = route["actions"]
        states = virl.walk(route, actions)
        assert actions[-1] == STOP and actions.count(STOP) == 1 and 2 <= len(route["legs"]) <= 4
        positions = [s[0] for s in states]
        assert len(set(positions[i] for i, a in enumerate(actions) if a == FORWARD)) == actions.count(FORWARD)
        t = 0
        for leg in route["legs"]:
            assert actions[t].startswith("turn_direction(")
            t += 1
            assert COMPASS[states[t][1]] == leg["direction"]
            for block in range(leg["blocks"]):
                assert actions[t] == FORWARD
                t += 1
                seen = dict(virl.observe(route, *states[t]))
                if block < leg["blocks"] - 1:  # "the NEXT intersection where ..." is the last one
                    assert leg["landmark"] not in seen
                else:
                    assert seen[leg["landmark"]] == leg["side"]
        assert t == len(actions) - 1
        assert virl.observe(route, *states[-1])[0][0] == route["legs"][-1]["landmark"]


def test_observe_depends_on_heading():
    route = {"landmarks": [[0, 0, "Starbucks", "north"]]}
    where = [virl.observe(route, (0, 0), h)[0][1] for h in range(8)]
    assert where == ["ahead", "left", "left", "left", "behind", "right", "right", "right"]
    assert virl.observe(route, (1, 0), 0) == []


# ---------------------------------------------------------------------------
# ID and OOD action spaces


def test_relative_turns_by_hand():
    north, east, south, northwest = 0, 2, 4, 7
    assert virl.to_relative(north, east) == "right"
    assert virl.to_relative(north, northwest) == "slightly left"
    assert virl.to_relative(northwest, 1) == "right"  # across north: northwest -> northeast
    assert virl.to_relative(east, north) == "left"
    assert virl.apply_turn(northwest, "right") == 1
    assert virl.apply_turn(north, "slightly left") == northwest
    with pytest.raises(ValueError):
        virl.to_relative(north, south)


@pytest.mark.parametrize("rule", ["id", "ood"])
def test_both_action_spaces_describe_every_turn(rule):
    for route in _routes(rule, seed=1):
        states = virl.walk(route, route["actions"])
        other = []
        for t, action in enumerate(route["actions"]):
            old, new = states[t][1], states[t + 1][1]
            if not action.startswith("turn_direction("):
                other.append(action)
                continue
            relative = virl.to_relative(old, new)
            assert virl.apply_turn(old, relative) == new
            assert virl.apply_turn(old, COMPASS[new]) == new
            assert action == turn_action(COMPASS[new] if rule == "id" else relative)
            other.append(turn_action(relative if rule == "id" else COMPASS[new]))
        assert virl.walk(route, other) == states


# ---------------------------------------------------------------------------
# verifier


@pytest.mark.parametrize("fmt", ["compact", "full"])
def test_demonstrations_score_correct_and_other_actions_wrong(fmt, compact, full):
    splits = compact if fmt == "compact" else full
    for split, examples in splits.items():
        for ex in examples:
            assert virl.score(ex, ex["demonstration"]).reward == 1.0
            other = STOP if ex["answer"] == FORWARD else FORWARD
            wrong = virl.score(ex, virl.to_code(other) if fmt == "compact" else other)
            assert (wrong.reward, wrong.status) == (-1.0, "wrong")


def test_full_parsing_is_lenient_and_compact_parsing_is_exact(full, compact):
    ex = next(e for e in full["train"] if e["answer"] == turn_action("northeast"))
    assert virl.score(ex, "Hmm, forward()? No. Action: Turn_Direction( 'North East' )").correct
    assert virl.score(ex, "turn_direction(north-east)\n").correct
    assert not virl.score(ex, "turn_direction(northeast) then forward()").correct
    ood = next(e for e in full["ood"] if e["answer"] == turn_action("slightly left"))
    assert virl.score(ood, 'turn_direction("Slightly_Left")').correct
    assert virl.score(ood, "turn_direction(slightly right)").status == "wrong"
    cex = next(e for e in compact["train"] if e["answer"] == turn_action("northeast"))
    assert virl.score(cex, " t:ne\n").correct and virl.score(cex, "T : NE").correct
    assert virl.score(cex, "T:N").status == "wrong"
    fex = next(e for e in compact["train"] if e["answer"] == FORWARD)
    assert virl.score(fex, "F").correct
    for junk in ("xF q", "F F", "T:NE F", "F.", "1F", "FS"):  # a code inside other text is no reply
        assert virl.score(fex, junk).status == "malformed", junk


def test_action_outside_the_rule_space_is_wrong(full):
    ex = next(e for e in full["train"] if e["answer"] == turn_action("east"))
    verdict = virl.score(ex, "turn_direction(right)")
    assert (verdict.reward, verdict.status, verdict.info["in_action_space"]) == (-1.0, "wrong", False)


@pytest.mark.parametrize("text", ["", "I am not sure.", "turn_direction(up)", "forward", "T:", "move F1"])
def test_malformed(text, full, compact):
    for ex in (full["train"][0], compact["train"][0]):
        verdict = virl.score(ex, text)
        assert (verdict.reward, verdict.status) == (-1.0, "malformed")


# ---------------------------------------------------------------------------
# prompts and splits


def test_prompts_show_the_observation_at_the_walked_position(compact, full):
    for c, f in zip(compact["test"], full["test"]):
        route, t = c["meta"]["route"], c["meta"]["step"]
        pos, heading = virl.walk(route, route["actions"][:t])[-1]
        seen = virl.observe(route, pos, heading)
        state = re.search(r"P:(\d) D:(\w+) O:(\S+)", c["prompt"]).groups()
        assert state[1] == virl.COMPASS_CODE[heading]
        assert state[2] == (",".join(virl.LANDMARKS[n] for n, _ in seen) or "-")
        # P names the instruction in progress, read back against the gold action (ID answers are absolute)
        instr = dict(tok.split(":", 1) if ":" in tok else (tok, "") for tok in
                     (re.sub(r"^(\d+)([A-Z])", r"\1:\2", tok) for tok in c["prompt"].split("\n")[0].split()))
        p, gold = int(state[0]), c["demonstration"]
        if gold.startswith("T:"):  # the next instruction is this very turn: T:<relative>><heading>
            assert re.sub(r"T:\w+>", "T:", instr[str(p if t == 0 else p + 1)]) == gold
        elif gold == "F":  # still walking the leg P describes
            assert p >= 2 and instr[str(p)].startswith("F:")
        else:  # stop: P is the last leg, followed by the stop instruction
            assert gold == "S" and instr[str(p + 1)] == "S"
        current = f["prompt"].split("Current observation: ")[1].split("\n")[0]
        assert f"facing {COMPASS[heading]}" in current
        assert all(n in current for n, _ in seen) and ("no landmark" in current) == (not seen)
        assert len(re.findall(r"\nAction \d+: ", f["prompt"])) == t


def test_compact_prompts_stay_within_budget(compact):
    lengths = [len(e["prompt"]) for v in compact.values() for e in v]
    assert max(lengths) <= 200 and max(len(e["demonstration"]) for v in compact.values() for e in v) <= 12
    route = _worst_route()
    assert len(route["actions"]) == 17
    prompt = virl.step_prompt(route, route["actions"][:16], "compact")
    assert len(prompt) <= 200 and prompt.count("T:") == 8 and "1T:SR>NE" in prompt


def test_full_prompt_lists_the_numbered_instructions():
    lines = virl.instructions(_worst_route())
    assert lines[0] == "1. First, turn slightly right to face northeast."  # from north: 45 degrees
    assert lines[2] == "3. Turn left to face northwest."
    assert lines[1] == "2. Move forward until you reach the next intersection where Museum of Art is on your left."
    assert lines[-1] == "9. Stop: Public Library is your destination."


def test_determinism_by_seed(compact):
    again = virl.build_splits(_cfg("compact"))
    assert again == compact
    other = virl.build_splits(_cfg("compact", seed=8))
    assert [e["prompt"] for e in other["train"]] != [e["prompt"] for e in compact["train"]]


def test_splits_are_disjoint_whole_routes_of_the_right_rule(compact):
    cfg = _cfg("compact")
    signatures, ids = {}, {}
    assert "pretrain" not in compact  # only when task.pretrain_size > 0
    for split, examples in compact.items():
        assert cfg.__dict__[f"{split}_size"] <= len(examples) < cfg.__dict__[f"{split}_size"] + 17
        by_route = {}
        for ex in examples:
            assert ex["meta"]["rule"] == ("ood" if split == "ood" else "id")
            by_route.setdefault(ex["meta"]["route_id"], []).append(ex["meta"]["step"])
        assert all(steps == list(range(len(steps))) for steps in by_route.values())
        ids[split] = set(by_route)
        signatures[split] = {virl._signature(ex["meta"]["route"]) for ex in examples}
        assert len(signatures[split]) == len(by_route)
    for a in compact:
        for b in compact:
            if a < b:
                assert not ids[a] & ids[b] and not signatures[a] & signatures[b]
    assert "A:rel" in compact["ood"][0]["prompt"] and "A:abs" in compact["test"][0]["prompt"]


def test_instructions_name_the_turn_and_the_heading_in_id_and_ood():
    """Reference (_parse_instruction_and_rail): "First, turn slightly left to face northeast." in both
    rules; only the action space differs, so an OOD turn is read off the instruction too."""
    route = {"rule": "ood", "start": [0, 0], "heading": "north",
             "legs": [{"direction": "northwest", "landmark": "Bakery", "side": "left", "blocks": 1},
                      {"direction": "northeast", "landmark": "Pharmacy", "side": "right", "blocks": 1}],
             "landmarks": [[-1, 1, "Bakery", "southwest"], [0, 2, "Pharmacy", "southeast"]],
             "actions": [turn_action("slightly left"), FORWARD, turn_action("right"), FORWARD, STOP]}
    assert virl.instructions(route)[:3] == [
        "1. First, turn slightly left to face northwest.",
        "2. Move forward until you reach the next intersection where Bakery is on your left.",
        "3. Turn right to face northeast."]
    # north -> northwest is slightly left (geometry); the reference's unwrapped 315 - 0 calls it "right"
    assert virl.leg_turns(route) == ["slightly left", "right"]
    ood = virl.step_prompt(route, [], "compact")
    absolute = virl.step_prompt({**route, "rule": "id"}, [], "compact")
    assert ood.startswith("1T:SL>NW 2F:BK 3T:R>NE 4F:PH 5S\nA:rel H:\nP:1 D:N")
    assert absolute.replace("A:abs", "A:rel") == ood  # same instructions, other action space
    full = virl.step_prompt(route, route["actions"][:2], "full")
    assert "3. Turn right to face northeast." in full and "left, right (90 degrees)" in full
    assert virl.score({"answer": turn_action("right"), "meta": {"format": "full", "rule": "ood"}},
                      "turn_direction(right)").correct


def test_relative_labels_depart_from_the_reference_on_six_wrapped_turns():
    """The reference labels a turn by next - prev compass degrees, unwrapped: < -45 left, > 45 right,
    [-45, 0] slightly left, [0, 45] slightly right. Ours wrap the angle; they differ on 6 of 32."""
    def reference_label(prev: int, new: int) -> str:
        delta = 45 * new - 45 * prev
        return "left" if delta < -45 else "right" if delta > 45 else "slightly left" if delta <= 0 else "slightly right"

    turns = [(old, (old + d) % 8) for old in range(8) for d in (-2, -1, 1, 2)]
    differ = [(COMPASS[a], COMPASS[b]) for a, b in turns if reference_label(a, b) != virl.to_relative(a, b)]
    assert len(turns) == 32 and len(differ) == 6
    assert ("north", "northwest") in differ and virl.to_relative(0, 7) == "slightly left"


@pytest.mark.parametrize("rule", ["id", "ood"])
def test_every_gold_turn_is_written_in_its_instruction(rule):
    """Answerability: at each turn step, the instruction in progress names the gold answer."""
    for route in _routes(rule, seed=2):
        turns, leg = virl.leg_turns(route), 0
        for t, action in enumerate(route["actions"]):
            if not action.startswith("turn_direction("):
                continue
            line = virl.instructions(route)[2 * leg]
            assert f"turn {turns[leg]} to face {route['legs'][leg]['direction']}." in line.lower()
            code = virl.to_code(action)
            instruction = virl.step_prompt(route, route["actions"][:t], "compact").split()[2 * leg]
            assert instruction.startswith(f"{2 * leg + 1}T:")
            assert code[2:] in instruction[len(f"{2 * leg + 1}T:"):].split(">")
            leg += 1


def test_pretrain_mix_holds_both_action_spaces():
    splits = virl.build_splits(_cfg("compact", pretrain=400))
    mix = splits["pretrain"]
    assert len(mix) >= 400 and {ex["meta"]["rule"] for ex in mix} == {"id", "ood"}
    held = {virl._signature(ex["meta"]["route"]) for split in ("train", "val", "test", "ood")
            for ex in splits[split]}
    assert not held & {virl._signature(ex["meta"]["route"]) for ex in mix}
    assert all(virl.score(ex, ex["demonstration"]).correct for ex in mix)
    assert splits["test"] == virl.build_splits(_cfg("compact"))["test"]  # the mix shifts no other split


def test_bad_format_is_a_one_line_error():
    with pytest.raises(ValueError, match="task.format"):
        virl.build_splits(_cfg("json"))


# ---------------------------------------------------------------------------
# episodes


def _oracle(examples, err_at=None, err_routes=None):
    """A generate() answering from the gold, except a wrong action at step `err_at`."""
    by_prompt = {e["prompt"]: e for e in examples}

    def generate(prompts):
        out = []
        for p in prompts:
            ex = by_prompt[p]  # a rebuilt prompt must equal the teacher-forced one
            erring = ex["meta"]["step"] == err_at and (err_routes is None or ex["meta"]["route_id"] in err_routes)
            out.append("no idea" if erring else ex["demonstration"])
        return out
    return generate


@pytest.mark.parametrize("fmt", ["compact", "full"])
def test_episodes_with_a_perfect_oracle(fmt, compact, full):
    examples = json.loads(json.dumps((compact if fmt == "compact" else full)["test"]))  # as read from JSONL
    metrics, samples = virl.evaluate_episodes(examples, _oracle(examples))
    n_routes = len({e["meta"]["route_id"] for e in examples})
    assert metrics == {"step_accuracy": 1.0, "route_success": 1.0, "routes": n_routes, "steps": len(examples)}
    assert sorted(s["id"] for s in samples) == sorted(e["id"] for e in examples)
    assert all(s["reward"] == 1.0 and s["status"] == "correct" for s in samples)


def test_episodes_end_at_the_first_error(compact):
    examples = compact["test"]
    n_routes = len({e["meta"]["route_id"] for e in examples})
    metrics, samples = virl.evaluate_episodes(examples, _oracle(examples, err_at=2))
    # every route has >= 5 steps: steps 0 and 1 right, step 2 malformed, rollout over
    assert metrics == {"step_accuracy": 2 / 3, "route_success": 0.0, "routes": n_routes, "steps": 3 * n_routes}
    assert [s["status"] for s in samples].count("malformed") == n_routes
    assert max(int(s["id"].rsplit("-", 1)[1]) for s in samples) == 2


def test_episodes_mixed_by_hand(compact):
    first, second = compact["test"][0]["meta"]["route_id"], None
    two = [e for e in compact["test"] if e["meta"]["route_id"] == first]
    second = next(e["meta"]["route_id"] for e in compact["test"] if e["meta"]["route_id"] != first)
    two += [e for e in compact["test"] if e["meta"]["route_id"] == second]
    n_second = two[-1]["meta"]["n_steps"]
    metrics, _ = virl.evaluate_episodes(two, _oracle(two, err_at=2, err_routes={first}))
    # route 1: 2 right + 1 wrong; route 2: all n_second right
    assert metrics["steps"] == 3 + n_second
    assert metrics["step_accuracy"] == pytest.approx((2 + n_second) / (3 + n_second))
    assert metrics["route_success"] == 0.5 and metrics["routes"] == 2
