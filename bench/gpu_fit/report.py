"""The printed table and the verdicts, from the report dictionary the run builds (pure)."""

from __future__ import annotations

from typing import Any

from bench.gpu_fit.measure import GOAL_CLICK_TO_LORA_S, GOAL_RATIO, is_goal_card, judge, ratio


def verdicts(model_key: str, auto: dict[str, Any], best: dict[str, Any] | None, *, gpu_name: str | None,
             smoke: bool) -> dict[str, Any]:
    """The ratio and the goals of one model; a CPU smoke run judges nothing (its speed means nothing)."""
    r = ratio(auto.get("steady_images_per_s"), best.get("images_per_s") if best else None)
    out: dict[str, Any] = {
        "auto_over_hand": r,
        "ratio_goal": f">= {GOAL_RATIO}",
        "ratio_verdict": judge(r, GOAL_RATIO, at_least=True, applies=not smoke),
    }
    if model_key == "sd15":
        out["click_to_lora_goal_s"] = GOAL_CLICK_TO_LORA_S
        out["click_to_lora_verdict"] = judge(auto.get("click_to_lora_s"), GOAL_CLICK_TO_LORA_S, at_least=False,
                                             applies=not smoke and is_goal_card(gpu_name))
    return out


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{fmt}}{suffix}"


def _rate(value: float | None) -> str:
    """Three significant figures or so: CPU smoke rates are hundredths, GPU images/s are tens."""
    if value is None:
        return "—"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def table(report: dict[str, Any]) -> str:
    """Markdown table of every run, then the ratios and goals, as pasted into bench/RESULTS.md."""
    head = ("| model | run | batch | steps/s | images/s | first step | click → LoRA | peak GPU MiB (device) "
            "| outcome |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = [head]
    lines: list[str] = []
    for key, model in report.get("models", {}).items():
        auto = model.get("auto", {})
        tier = f"tier {auto['memory_tier']}" if auto.get("memory_tier") else "no tier: the preset"
        precision = {"no": "fp32", None: "?"}.get(auto.get("mixed_precision"), auto.get("mixed_precision"))
        outcome = auto.get("state") or "—"
        if auto.get("error"):
            outcome += f": {auto['error']}"
        rows.append(f"| {key} | daemon, automatic ({tier}, {precision}) | "
                    f"{auto.get('batch_size') or '—'} | {_rate(auto.get('steady_steps_per_s'))} | "
                    f"{_rate(auto.get('steady_images_per_s'))} | {_num(auto.get('first_step_s'), '.1f', ' s')} | "
                    f"{_num(auto.get('click_to_lora_s'), '.1f', ' s')} | {_num(auto.get('peak_mib'), 'd')} | "
                    f"{outcome} |")
        hand = model.get("hand", {})
        best = hand.get("best") or {}
        for run in hand.get("runs", []):
            mark = " (best)" if best and run["batch"] == best.get("batch") else ""
            note = f": {run['note']}" if run.get("note") else ""
            rows.append(f"| {key} | kohya by hand{mark} | {run['batch']} | {_rate(run.get('steps_per_s'))} | "
                        f"{_rate(run.get('images_per_s'))} | {_num(run.get('first_step_s'), '.1f', ' s')} | — | "
                        f"{_num(run.get('peak_mib'), 'd')} | {run['outcome']}{note} |")
        v = model.get("verdicts", {})
        lines.append(f"- {key}: auto ÷ best hand-tuned images/s = {_num(v.get('auto_over_hand'), '.3f')} "
                     f"(goal {v.get('ratio_goal')}: {v.get('ratio_verdict')})"
                     + (f"; sweep stopped: {hand['stopped']}" if hand.get("stopped") else ""))
        if "click_to_lora_verdict" in v:
            lines.append(f"- {key}: click → LoRA {_num(auto.get('click_to_lora_s'), '.1f', ' s')} "
                         f"(goal <= {v['click_to_lora_goal_s']:.0f} s on an H100/H200: {v['click_to_lora_verdict']})")
        if auto.get("fit"):
            lines.append(f"- {key}: /fit said: {auto['fit'].get('reason')}")
        if auto.get("memory_tier_refused"):
            lines.append(f"- {key}: this daemon refused memory_tier ({auto['memory_tier_refused']}); "
                         "it trained with its preset instead")
    return "\n".join([*rows, "", *lines])
