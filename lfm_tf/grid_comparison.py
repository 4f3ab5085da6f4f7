"""Where a grid's arms under test stand against its control arms.

A method is only as good as its margin over the controls given the same
splits: step-matched ERM, its own ablations and the best loss-only
baselines. The report's comparison takes, for every arm under test
(`--grid_compare`) and every control (`--grid_controls`), the difference of
test accuracy *paired by seed*: cells of one seed share their splits, long
tail and label noise, so the per-seed difference leaves out the luck of the
split that an unpaired difference of means carries. It then says in words
where an arm under test loses, so a partial or unflattering grid states it.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


def paired_differences(rows: Sequence[Dict], setting: str, arm: str,
                       control: str) -> List[float]:
    """Test accuracy of `arm` minus `control`, in points, per seed.

    Args:
      rows: the grid's rows (`benchmark_grid.collect_rows`).
      setting: the setting's name.
      arm, control: method names.

    Returns:
      One difference per seed at which both cells finished, by seed.
    """
    def accuracies(method):
        return {r["seed"]: r["test_accuracy"] for r in rows
                if r["setting"] == setting and r["method"] == method
                and r["status"] == "done" and r["test_accuracy"] is not None}

    mine, theirs = accuracies(arm), accuracies(control)
    return [100.0 * (mine[seed] - theirs[seed])
            for seed in sorted(set(mine) & set(theirs))]


def agreement(differences: Sequence[float]) -> Optional[str]:
    """"above" / "below" when at least two seeds all agree in sign (as
    printed, to 2 decimals), else None: one seed has no spread, so its
    sign is a single draw."""
    rounded = [round(d, 2) for d in differences]
    if len(rounded) < 2:
        return None
    if all(d > 0 for d in rounded):
        return "above"
    if all(d < 0 for d in rounded):
        return "below"
    return None


def difference_text(differences: Sequence[float]) -> str:
    """`+1.23 ± 0.45 (3)`, `▲` / `▼` appended when every seed agrees."""
    if not differences:
        return "–"
    text = f"{np.mean(differences):+.2f}"
    if len(differences) > 1:
        text += f" ± {np.std(differences, ddof=1):.2f}"
    text += f" ({len(differences)})"
    mark = {"above": " ▲", "below": " ▼"}.get(agreement(differences), "")
    return text + mark


def _seeds_text(differences):
    n = len(differences)
    if n == 1:
        return "one seed"
    side = agreement(differences)
    return f"{n} seeds" + (f", {side} on every one" if side else
                           ", the seeds disagreeing")


def _names_text(items):
    parts = [f"{name} ({np.mean(d):+.2f}, {_seeds_text(d)})"
             for name, d in items]
    return parts[0] if len(parts) == 1 else (
        ", ".join(parts[:-1]) + " and " + parts[-1])


def verdict_line(setting: str, arm: str,
                 by_control: Sequence[Tuple[str, List[float]]]) -> str:
    """One plain sentence: which controls `arm` is below, ties and is
    above in `setting` (mean paired difference, in points)."""
    finished = [(c, d) for c, d in by_control if d]
    below = [(c, d) for c, d in finished if round(np.mean(d), 2) < 0]
    above = [(c, d) for c, d in finished if round(np.mean(d), 2) > 0]
    tied = [(c, d) for c, d in finished if round(np.mean(d), 2) == 0]
    clauses = []
    if below:
        clauses.append("**below** " + _names_text(below))
    if tied:
        clauses.append("level with " + _names_text(tied))
    if above:
        clauses.append("above " + _names_text(above))
    if not clauses:
        return f"- {setting}, `{arm}`: no control has finished a seed it has."
    return (f"- {setting}, `{arm}`: " + "; ".join(clauses)
            + ("." if below else ": it loses to no control that has run."))


def comparison_lines(rows: Sequence[Dict], settings: Sequence[str],
                     compare: Sequence[str],
                     controls: Sequence[str]) -> List[str]:
    """The report's comparison: a table of paired differences (arms under
    test x controls, per setting) and one sentence per arm and setting
    saying where it loses. [] when no comparison is configured."""
    if not compare or not controls:
        return []
    lines = [
        "", "Where the arms under test (`--grid_compare`) stand against the "
        "controls (`--grid_controls`): test accuracy of the arm minus the "
        "control's, in points, paired by seed (cells of one seed share "
        "their splits, long tail and noise), mean ± std over the seeds both "
        "finished (n); ▲ / ▼ when at least two seeds agree that the arm is "
        "above / below. One seed has no spread: its sign is one draw.", "",
        "| setting | arm | " + " | ".join(controls) + " |",
        "|---|---|" + "---|" * len(controls)]
    sentences = []
    for setting in settings:
        for arm in compare:
            by_control = [(c, paired_differences(rows, setting, arm, c))
                          for c in controls if c != arm]
            if not any(d for _, d in by_control):
                continue
            cells = dict((c, difference_text(d)) for c, d in by_control)
            lines.append(f"| {setting} | {arm} | " + " | ".join(
                cells.get(c, "(itself)") for c in controls) + " |")
            sentences.append(verdict_line(setting, arm, by_control))
    if not sentences:
        return lines[:2] + ["", "No arm under test shares a finished seed "
                            "with a control yet."]
    return lines + ["", "In words:", ""] + sentences
