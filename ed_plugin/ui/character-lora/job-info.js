// What a job trained: the model family and how the run fit the card, from the params the daemon stored.
import { TIER_LABELS } from "./constants.js"
import { archLabel } from "./form-rules.js"
import { state } from "./store.js"
import { loraArch } from "./use-lora.js"

export function tierLabel(id) {
    const known = state.tiers.find((t) => t.id === id)
    return (known && known.label) || TIER_LABELS[id] || String(id)
}

/** "SDXL", "SD 1.x": the family of the job's base model (and so of its LoRA). */
export function jobArchLabel(job) {
    return archLabel(loraArch(job))
}

/** "SDXL · 1024 px · memory tier 24 GB · batch 4, bf16": the settings the job ran with, as far as stored. */
export function jobSettingsText(job) {
    const p = (job && job.params) || {}
    const parts = [jobArchLabel(job)]
    if (p.resolution) parts.push(p.resolution + " px")
    if (p.memory_tier) parts.push("memory tier " + tierLabel(p.memory_tier))
    const run = []
    if (p.batch_size) run.push("batch " + p.batch_size)
    if (p.mixed_precision && p.mixed_precision !== "no") run.push(p.mixed_precision)
    if (p.gradient_checkpointing) run.push("gradient checkpointing")
    if (run.length) parts.push(run.join(", "))
    return parts.join(" · ")
}
