"""V-IRL navigation, text only, after Chu et al. 2025 ("SFT Memorizes, RL Generalizes").

A route is walked on an unbounded 8-connected city grid: every lattice point is
an intersection, streets and diagonal avenues join neighbours, and some
intersections hold a named landmark. A route has 2-4 legs; each leg is "turn
<relative turn> to face <compass point>" then "move forward until the next
intersection where <landmark> is", and the route ends with stop. Every turn
changes the heading by 45 or 90 degrees. As in the reference
(LeslieTrue/SFTvsRL, gym/gym_virl/envs/navigation_environment.py,
`NavigationEnvironment._parse_instruction_and_rail`), the instruction names
BOTH the relative turn and the new heading ("First, turn slightly left to face
northeast."), in ID and OOD alike; the rules differ only in the ACTION SPACE:
ID turns are absolute (turn_direction(north) ... northwest), OOD turns are
relative (left, right, slightly left, slightly right), so either answer can be
read off the instruction. Examples are one per route STEP, with the gold
history (teacher forcing); `meta["route"]` keeps the whole route so
`evaluate_episodes` can rebuild prompts from the model's own history.

The pretraining mix (split "pretrain", only when task.pretrain_size > 0) holds
routes of both action spaces, so a tiny from-scratch model can be given the
skill the OOD split tests before fine-tuning on the ID space alone.

Departures from the paper and the reference:
1. A generated grid world instead of Google Street View; observations are text.
2. Compact format for the tiny CPU model: instructions, action space, action
   history and the current state (instruction in progress `P`, heading `D`,
   landmarks in sight `O`) in one short string; a turn instruction reads
   `T:SL>NE` (turn slightly left to face northeast); answers are codes (F, S,
   T:NE, T:SL) that map 1:1 to forward(), stop(), turn_direction(x).
3. Episodes end at the first wrong action: the world is static, so a wrong
   step leaves the agent off the route (the route counts as failed).
4. Split sizes count steps; whole routes are kept, so a split holds the first
   route count whose steps reach the size (it may exceed it by < 1 route).
5. Relative turns are geometric: the heading change is wrapped to
   (-180, 180], so north -> northwest is "slightly left". The reference
   subtracts compass degrees without wrapping and calls every change above
   +45 "right" and below -45 "left", so it labels e.g. north -> northwest
   (0 -> 315) "right" (6 of the 32 turns of this grid get a wrong label there).
6. A compact reply is exactly one code (letter case and surrounding whitespace
   aside), as its demonstrations are; anything else is malformed. Earlier
   versions of this file took the last code anywhere in the reply, which let
   unreadable samples (e.g. "xF q") score on the many forward steps (README's
   tiny-virl sweep was scored that way). The full format stays lenient.
"""

from __future__ import annotations

import random
import re
from typing import Callable

from amft_cli.tasks.base import Score
from amft_cli.tasks.revision import Attempt, Episode

SPLITS = ("train", "val", "test", "ood", "pretrain")  # pretrain only when task.pretrain_size > 0
FORMATS = ("full", "compact")
COMPASS = ("north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest")
COMPASS_CODE = ("N", "NE", "E", "SE", "S", "SW", "W", "NW")
# heading index i points 45*i degrees clockwise from north; (dx, dy) with north = +y
STEP_VECTORS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))
# relative turn name -> heading change in 45-degree units (clockwise positive)
RELATIVE = {"left": -2, "slightly left": -1, "slightly right": 1, "right": 2}
RELATIVE_CODE = {"left": "L", "slightly left": "SL", "slightly right": "SR", "right": "R"}
LANDMARKS = {
    "Starbucks": "SB", "City Bank": "CB", "Central Park": "CP", "Post Office": "PO",
    "Fire Station": "FS", "Public Library": "PL", "Grand Hotel": "GH", "Museum of Art": "MA",
    "Town Hall": "TH", "Police Station": "PS", "Pizza Place": "PZ", "Bus Terminal": "BT",
    "Flower Shop": "FL", "Gas Station": "GS", "High School": "HS", "Movie Theater": "MT",
    "Bakery": "BK", "Pharmacy": "PH", "Supermarket": "SM", "Train Station": "TS",
    "Dental Clinic": "DC", "Book Store": "BS", "City Hospital": "CH", "Sports Arena": "SA",
}
FORWARD, STOP = "forward()", "stop()"
MAX_COMPLETION_CHARS = 20_000  # the verifier's time bound: only the tail is parsed


def turn_action(x: str) -> str:
    return f"turn_direction({x})"


# ---------------------------------------------------------------------------
# headings and turns


def to_relative(old: int, new: int) -> str:
    """The relative turn name taking heading index `old` to `new` (45 or 90 degrees)."""
    delta = (new - old + 4) % 8 - 4
    for name, d in RELATIVE.items():
        if d == delta:
            return name
    raise ValueError(f"turn from {COMPASS[old]} to {COMPASS[new]} is not a 45/90-degree turn")


def apply_turn(heading: int, x: str) -> int:
    """Heading index after turn_direction(x); x is a compass point or a relative turn."""
    return COMPASS.index(x) if x in COMPASS else (heading + RELATIVE[x]) % 8


def walk(route: dict, actions: list[str]) -> list[tuple[tuple[int, int], int]]:
    """States (position, heading index) before each action and after the last: len(actions)+1."""
    pos, heading = tuple(route["start"]), COMPASS.index(route["heading"])
    states = [(pos, heading)]
    for action in actions:
        if action == FORWARD:
            dx, dy = STEP_VECTORS[heading]
            pos = (pos[0] + dx, pos[1] + dy)
        elif action.startswith("turn_direction("):
            heading = apply_turn(heading, action[len("turn_direction("):-1])
        states.append((pos, heading))
    return states


def observe(route: dict, pos: tuple[int, int], heading: int) -> list[tuple[str, str]]:
    """Landmarks at `pos` as (name, where) with where in left/right/ahead/behind.

    A landmark stands on one side of its intersection (`bearing`), so the side
    it appears on depends on the way the agent faces.
    """
    seen = []
    for x, y, name, bearing in route["landmarks"]:
        if (x, y) == tuple(pos):
            rel = (COMPASS.index(bearing) - heading) % 8
            where = "ahead" if rel == 0 else "behind" if rel == 4 else "right" if rel < 4 else "left"
            seen.append((name, where))
    return seen


# ---------------------------------------------------------------------------
# route generation


def make_route(rng: random.Random, rule: str) -> dict:
    """One route (JSON-friendly) whose gold actions are in the `rule` action space (id | ood)."""
    while True:
        route = _try_route(rng, rule)
        if route is not None:
            return route


def _try_route(rng: random.Random, rule: str) -> dict | None:
    """A candidate route, or None when it crosses itself (each position then has one view)."""
    start, start_heading = [rng.randrange(20), rng.randrange(20)], rng.randrange(8)
    pos, heading, names = tuple(start), start_heading, list(LANDMARKS)
    visited, legs, landmarks, actions = {pos}, [], [], []
    for _ in range(rng.randint(2, 4)):
        new = (heading + rng.choice((-2, -1, 1, 2))) % 8
        actions.append(turn_action(COMPASS[new] if rule == "id" else to_relative(heading, new)))
        heading = new
        previous = legs[-1]["landmark"] if legs else None
        target = rng.choice([n for n in names if n != previous])
        others = [n for n in names if n != target]
        if not legs and rng.random() < 0.5:  # something to see at the start, never the first target
            landmarks.append([*start, rng.choice(others), COMPASS[rng.randrange(8)]])
        leg = {"direction": COMPASS[new], "landmark": target,
               "side": rng.choice(("left", "right")), "blocks": rng.randint(1, 3)}
        for block in range(leg["blocks"]):
            dx, dy = STEP_VECTORS[heading]
            pos = (pos[0] + dx, pos[1] + dy)
            if pos in visited:
                return None
            visited.add(pos)
            actions.append(FORWARD)
            if block == leg["blocks"] - 1:  # the target stands on the promised side on arrival
                bearing = (heading + (-2 if leg["side"] == "left" else 2)) % 8
                landmarks.append([*pos, target, COMPASS[bearing]])
            elif rng.random() < 0.35:  # a distractor, never the landmark this leg looks for
                landmarks.append([*pos, rng.choice(others), COMPASS[rng.randrange(8)]])
        legs.append(leg)
    actions.append(STOP)
    return {"rule": rule, "start": start, "heading": COMPASS[start_heading],
            "legs": legs, "landmarks": landmarks, "actions": actions}


# ---------------------------------------------------------------------------
# prompts


def leg_turns(route: dict) -> list[str]:
    """The relative turn that starts each leg (from the start heading, then from the previous leg's)."""
    headings = [route["heading"]] + [leg["direction"] for leg in route["legs"]]
    return [to_relative(COMPASS.index(a), COMPASS.index(b)) for a, b in zip(headings, headings[1:])]


def instructions(route: dict) -> list[str]:
    """The numbered route instructions (full format): turn, move per leg, then stop."""
    lines = []
    for i, (leg, turn) in enumerate(zip(route["legs"], leg_turns(route))):
        lines.append(f"{'First, turn' if i == 0 else 'Turn'} {turn} to face {leg['direction']}.")
        lines.append(f"Move forward until you reach the next intersection where "
                     f"{leg['landmark']} is on your {leg['side']}.")
    lines.append(f"Stop: {route['legs'][-1]['landmark']} is your destination.")
    return [f"{i}. {line}" for i, line in enumerate(lines, 1)]


def to_code(action: str) -> str:
    """Compact code of a canonical action: F, S, T:NE (absolute) or T:SL (relative)."""
    if action == FORWARD:
        return "F"
    if action == STOP:
        return "S"
    x = action[len("turn_direction("):-1]
    return "T:" + (COMPASS_CODE[COMPASS.index(x)] if x in COMPASS else RELATIVE_CODE[x])


def _observation(route: dict, pos: tuple[int, int], heading: int) -> str:
    seen = observe(route, pos, heading)
    text = f"You are facing {COMPASS[heading]} at an intersection."
    if not seen:
        return text + " There is no landmark here."
    phrase = {"left": "on your left", "right": "on your right", "ahead": "ahead", "behind": "behind you"}
    return text + "".join(f" {name} is {phrase[where]}." for name, where in seen)


def _action_space(rule: str) -> str:
    if rule == "id":
        return ("forward() moves to the next intersection; turn_direction(x) turns to face x, where x is "
                "one of " + ", ".join(COMPASS) + "; stop() ends the route.")
    return ("forward() moves to the next intersection; turn_direction(x) turns relative to the way you "
            "face, where x is one of left, right (90 degrees), slightly left, slightly right (45 degrees); "
            "stop() ends the route.")


def step_prompt(route: dict, history: list[str], fmt: str) -> str:
    """The prompt before action number len(history), given the canonical actions taken so far."""
    states = walk(route, history)
    if fmt == "compact":
        return _compact_prompt(route, history, states[-1])
    lines = ["You are walking through a city, following route instructions.", "", "Instructions:",
             *instructions(route), "", "Action space: " + _action_space(route["rule"]), "", "History:"]
    for t, action in enumerate(history):
        lines += [f"Observation {t + 1}: {_observation(route, *states[t])}", f"Action {t + 1}: {action}"]
    if not history:
        lines.append("(none)")
    lines += ["", f"Current observation: {_observation(route, *states[-1])}", "",
              "What is your next action? End your reply with exactly one action from the action space."]
    return "\n".join(lines)


def _compact_prompt(route: dict, history: list[str], state: tuple[tuple[int, int], int]) -> str:
    """E.g. '1T:R>E 2F:SB 3T:SL>NE 4F:CB 5S\\nA:abs H:T:E F F\\nP:4 D:NE O:SB\\n>'.

    The state is spelled out so the tiny model need not count history tokens:
    P is the instruction in progress (1 before any turn, else the move
    instruction of the leg begun by the latest turn), D the heading and O the
    landmark codes in sight ('-' for none).
    """
    codes = []
    for i, (leg, turn) in enumerate(zip(route["legs"], leg_turns(route))):
        codes += [f"{2 * i + 1}T:{RELATIVE_CODE[turn]}>{COMPASS_CODE[COMPASS.index(leg['direction'])]}",
                  f"{2 * i + 2}F:{LANDMARKS[leg['landmark']]}"]
    codes.append(f"{len(codes) + 1}S")
    turns = sum(a.startswith("turn_direction(") for a in history)
    pos, heading = state
    seen = ",".join(LANDMARKS[n] for n, _ in observe(route, pos, heading)) or "-"
    space = "abs" if route["rule"] == "id" else "rel"
    return (" ".join(codes) + f"\nA:{space} H:" + " ".join(to_code(a) for a in history)
            + f"\nP:{2 * turns if turns else 1} D:{COMPASS_CODE[heading]} O:{seen}\n>")


# ---------------------------------------------------------------------------
# verifier

_ARG = r"slightly[\s_-]*(?:left|right)|left|right|(?:north|south)(?:[\s_-]*(?:east|west))?|east|west"
_FULL_RE = re.compile(r"(forward|stop)\s*\(\s*\)|turn_direction\s*\(\s*[\"']?(" + _ARG + r")[\"']?\s*\)",
                      re.IGNORECASE)
_COMPACT_RE = re.compile(r"\s*(T\s*:\s*(?:NE|NW|SE|SW|SL|SR|N|E|S|W|L|R)|F|S)\s*")  # the whole reply
_BY_CODE = {to_code(turn_action(x)): turn_action(x) for x in (*COMPASS, *RELATIVE)} | {"F": FORWARD, "S": STOP}


def parse_action(completion: str, fmt: str) -> str | None:
    """The action `completion` names, as a canonical action string, or None. Full format: the
    last action call anywhere in the text. Compact: the reply must be exactly one code (letter
    case and surrounding whitespace aside), as its demonstrations are."""
    text = completion[-MAX_COMPLETION_CHARS:]
    if fmt == "compact":
        found = _COMPACT_RE.fullmatch(text.upper())
        return _BY_CODE[re.sub(r"\s+", "", found.group(1))] if found else None
    found = list(_FULL_RE.finditer(text))
    if not found:
        return None
    name, arg = found[-1].group(1), found[-1].group(2)
    if name:
        return f"{name.lower()}()"
    arg = re.sub(r"[\s_-]+", "", arg.lower())
    return turn_action("slightly " + arg[len("slightly"):] if arg.startswith("slightly") else arg)


def _in_space(action: str, rule: str) -> bool:
    x = action[len("turn_direction("):-1] if action.startswith("turn_direction(") else None
    return x is None or (x in COMPASS if rule == "id" else x in RELATIVE)


def _score_action(gold: str, completion: str, fmt: str, rule: str) -> Score:
    action = parse_action(completion, fmt)
    if action is None:
        return Score(-1.0, "malformed", {"action": None, "gold": gold,
                                         "error": "your reply names no action from the action space"})
    info = {"action": action, "gold": gold, "in_action_space": _in_space(action, rule)}
    if action == gold:
        return Score(1.0, "correct", info)
    return Score(-1.0, "wrong", {**info, "error": f"{action} is not the right action here"
                                 + ("" if info["in_action_space"] else " (nor in the action space)")})


def score(example: dict, completion: str) -> Score:
    """+1 if the last action in `completion` is the gold action, else -1 (wrong or malformed)."""
    meta = example["meta"]
    return _score_action(example["answer"], completion, meta["format"], meta["rule"])


# ---------------------------------------------------------------------------
# splits


def _route_examples(route: dict, route_id: str, fmt: str) -> list[dict]:
    actions, n = route["actions"], len(route["actions"])
    demo = to_code if fmt == "compact" else (lambda a: a)
    return [{"id": f"{route_id}/step-{t}", "prompt": step_prompt(route, actions[:t], fmt),
             "demonstration": demo(actions[t]), "answer": actions[t],
             "meta": {"route_id": route_id, "step": t, "rule": route["rule"], "n_steps": n,
                      "format": fmt, "route": route}}
            for t in range(n)]


def _signature(route: dict) -> tuple:
    """What the instruction text says; routes sharing it are the same task to a reader."""
    return tuple((leg["direction"], leg["landmark"], leg["side"]) for leg in route["legs"])


def build_splits(tcfg) -> dict[str, list[dict]]:
    """Train/val/test (absolute actions), ood (relative actions) and, when tcfg.pretrain_size > 0,
    pretrain (either action space, half each); sizes count steps.

    Each split has its own generator seeded by (seed, split); a route whose
    instructions already appear in an earlier split is skipped, so val, test,
    ood and pretrain share no instruction text with train or with each other.
    """
    if tcfg.format not in FORMATS:
        raise ValueError(f"task.format: expected one of {', '.join(FORMATS)} for virl, got {tcfg.format!r}")
    seen: set[tuple] = set()
    splits = {}
    for split in SPLITS:
        size = getattr(tcfg, f"{split}_size")
        if size < 0:
            raise ValueError(f"task.{split}_size: expected a count >= 0, got {size}")
        if split == "pretrain" and size == 0:
            continue
        rng = random.Random(f"virl-{tcfg.seed}-{split}")
        examples: list[dict] = []
        n_routes = 0
        while len(examples) < size:
            rule = {"ood": "ood", "pretrain": rng.choice(("id", "ood"))}.get(split, "id")
            route = make_route(rng, rule)
            if _signature(route) in seen:
                continue
            seen.add(_signature(route))
            n_routes += 1
            examples += _route_examples(route, f"{split}-route-{n_routes}", tcfg.format)
        splits[split] = examples
    return splits


# ---------------------------------------------------------------------------
# episodes


def evaluate_episodes(examples: list[dict], generate: Callable[[list], list[str]],
                      verify_iter: int = 1) -> tuple[dict, list[dict]]:
    """Roll every route in `examples` out from step 0 with the model's own actions.

    At step t the prompt's history holds the model's earlier actions. Each step
    gets up to verify_iter attempts (sequential revision, tasks/revision.py: a
    failed attempt comes back with the verifier's message, and the count starts
    afresh after each correct step, as the reference's `move_on_rail` resets
    `remaining_step`). The world is static, so a step failed in all its
    attempts fails the route and ends its rollout. Each call to `generate` gets
    one prompt (a text, or a conversation after a failed attempt) per active
    route. Returns ({step_accuracy (steps solved / steps tried), route_success,
    routes, steps[, attempts]}, samples), one sample {id, attempt, prompt,
    completion, reward, status} per attempt.
    """
    routes: dict[str, dict] = {}
    fmt: dict[str, str] = {}
    for ex in examples:
        routes.setdefault(ex["meta"]["route_id"], ex["meta"]["route"])
        fmt.setdefault(ex["meta"]["route_id"], ex["meta"]["format"])
    history: dict[str, list[str]] = {rid: [] for rid in routes}
    tries = {rid: Episode({"prompt": step_prompt(routes[rid], [], fmt[rid])}) for rid in routes}
    active, samples, solved, succeeded = list(routes), [], 0, 0
    while active:
        prompts = [tries[rid].conversation() for rid in active]
        still = []
        for rid, prompt, completion in zip(active, prompts, generate(prompts)):
            route, t, episode = routes[rid], len(history[rid]), tries[rid]
            verdict = _score_action(route["actions"][t], completion, fmt[rid], route["rule"])
            samples.append({"id": f"{rid}/step-{t}", "attempt": len(episode.attempts), "prompt": prompt,
                            "completion": completion, "reward": verdict.reward, "status": verdict.status})
            episode.attempts.append(Attempt(completion, verdict))
            if not verdict.correct:
                if episode.open(verify_iter):
                    still.append(rid)
                continue
            solved += 1
            history[rid].append(route["actions"][t])
            if len(history[rid]) == len(route["actions"]):
                succeeded += 1
            else:
                tries[rid] = Episode({"prompt": step_prompt(route, history[rid], fmt[rid])})
                still.append(rid)
        active = still
    steps = len({s["id"] for s in samples})
    metrics = {"step_accuracy": solved / steps if steps else 0.0,
               "route_success": succeeded / len(routes) if routes else 0.0, "routes": len(routes), "steps": steps}
    if verify_iter > 1:
        metrics["attempts"] = len(samples)
    return metrics, samples
