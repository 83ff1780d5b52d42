// The job panel: state, progress tiles, log, actions (Cancel, Resume, Use it) for the job in view.
import { DEFAULT_LORA_WEIGHT, STATE_LABELS } from "../constants.js"
import { el, icon, toast } from "../dom.js"
import { fmtDuration, fmtRate, isFinished } from "../format.js"
import { client, upsertJob, selectedJob, scheduleRender } from "../store.js"
import { ui } from "./ui.js"
import { finishing, useLora } from "../use-lora.js"
import { pruneSamples, updateSamples, closeViewer } from "./gallery.js"
import { jobSettingsText } from "../job-info.js"
import { activeRetry, canResume, listedNotices, resumePlan, stateSizeText } from "../recovery.js"
import { makeLossChart, updateLossChart } from "./loss-chart.js"
import { updateEpochGallery } from "./gallery.js"
import { ensureLoss, loadCheckpoints, losses, saved, wantsCheckpoints } from "../checkpoints.js"

// the chart follows the panel's width
window.addEventListener("resize", () => scheduleRender())

export let samplesJobId = null
export let renderedJobKey = null
export function renderJobPanel() {
    if (!ui.jobPanel) return
    const job = selectedJob()
    const shownId = job ? job.id : null
    if (shownId !== samplesJobId) {
        // another job (or none) in the panel: let the previous job's pictures go
        samplesJobId = shownId
        closeViewer()
        pruneSamples(shownId)
    }
    if (!job) {
        renderedJobKey = null
        ui.jobPanel.replaceChildren(el("h4", {}, icon("fa-hourglass-half"), "Training"), el("div", { className: "clora-empty", text: "No training yet. Fill in the form and press Start training." }))
        return
    }
    // rebuild the panel when the job or its state changes; otherwise update in place (keeps log scroll)
    const key = job.id + "|" + job.state + "|" + (job.lora_id || "") + "|" + (finishing.has(job.id) ? 1 : 0)
    if (key !== renderedJobKey) {
        renderedJobKey = key
        buildJobPanel(job)
    }
    updateJobPanel(job)
}
export function buildJobPanel(job) {
    const p = {}
    p.badge = el("span", { className: "clora-badge", attrs: { "data-state": job.state, "data-clora": "job-state" }, text: STATE_LABELS[job.state] || job.state })
    p.bar = el("div", { className: "clora-bar", attrs: { "data-state": job.state, role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100", "data-clora": "progress" } }, el("div"))
    const stat = (label, name) => {
        const v = el("b", { attrs: { "data-clora": "stat-" + name }, text: "–" })
        p[name] = v
        return el("div", {}, el("span", { text: label }), v)
    }
    p.stats = el("div", { className: "clora-stats" }, stat("Step", "step"), stat("Epoch", "epoch"), stat("Loss", "loss"), stat("Speed", "rate"), stat("Time left", "eta"))
    p.samples = el("div", { className: "clora-samples", attrs: { "data-clora": "samples", hidden: true } })
    p.sampleNodes = new Map() // sample url -> {btn, img}
    p.samplesKey = null
    p.chart = makeLossChart()
    p.epochs = el("div", { className: "clora-samples clora-epochs", attrs: { "data-clora": "epochs", hidden: true } })
    p.epochSampleNodes = new Map() // sample url -> {btn, img} in the epochs' cards
    p.epochsKey = null
    // the job's state changed: its saved epochs (the final one, previews) may have too
    if (wantsCheckpoints(job)) loadCheckpoints(job.id, { force: true })
    p.settings = el("div", { className: "clora-small clora-job-settings", attrs: { "data-clora": "job-settings" } })
    p.recovery = el("div", { className: "clora-recovery", attrs: { "data-clora": "recovery", hidden: true } })
    p.recoveryKey = null
    p.log = el("pre", { className: "clora-log", attrs: { "data-clora": "log", "aria-live": "off" } })
    p.actions = el("div", { className: "clora-actions" })
    if (!isFinished(job)) {
        const cancel = el("button", { className: "secondaryButton", attrs: { type: "button", "data-clora": "cancel" } }, icon("fa-stop"), " Cancel")
        let armed = false
        let timer = null
        cancel.addEventListener("click", async () => {
            if (!armed) {
                armed = true
                cancel.lastChild.textContent = " Click again to cancel"
                timer = setTimeout(() => {
                    armed = false
                    cancel.lastChild.textContent = " Cancel"
                }, 4000)
                return
            }
            clearTimeout(timer)
            cancel.disabled = true
            cancel.lastChild.textContent = " Cancelling…"
            try {
                const j = await client.request("POST", "/jobs/" + encodeURIComponent(job.id) + "/cancel", null, { timeoutMs: 30000 })
                if (j && j.id) upsertJob(j)
            } catch (e) {
                toast("Could not cancel: " + e.message, true)
                cancel.disabled = false
                cancel.lastChild.textContent = " Cancel"
            }
            scheduleRender()
        })
        p.actions.appendChild(cancel)
    }
    let result = null
    const resumable = canResume(job)
    if (resumable) {
        p.resumeError = el("div", { className: "clora-err", attrs: { "data-clora": "resume-error", role: "alert" } })
        p.actions.appendChild(resumeButton(job, p))
    }
    if (job.state === "done") {
        const use = el("button", { className: "primaryButton", attrs: { type: "button", "data-clora": "use-it" }, on: { click: () => useLora(job) } }, icon("fa-wand-magic-sparkles"), " Use it")
        use.disabled = !job.lora_id || finishing.has(job.id)
        result = el(
            "div",
            { className: "clora-result clora-ok", attrs: { "data-clora": "result" } },
            el("div", {}, icon("fa-circle-check"), " Saved as LoRA ", el("code", { text: job.lora_id || "?" })),
            el("div", { className: "clora-small", text: "Prompt with “" + job.trigger + "”; a weight around " + DEFAULT_LORA_WEIGHT + " is a good start." }),
            el("div", { className: "clora-actions" }, use)
        )
    } else if (job.state === "error" || job.state === "interrupted" || job.state === "cancelled") {
        const err = job.error || {}
        result = el(
            "div",
            { className: "clora-result clora-error", attrs: { "data-clora": "result" } },
            el("div", { text: err.message || (job.state === "cancelled" ? "Training was cancelled." : job.state === "interrupted" ? "Training was interrupted (the daemon stopped)." : "Training failed.") }),
            // an interrupted job's hint ("start it again") is what Resume does: say what Resume will do instead
            resumable ? el("div", { className: "clora-small", attrs: { "data-clora": "resume-plan" }, text: resumePlan(job) }) : null,
            // ...but a job kept resumable after a failure it can get over (its base model's drive unplugged) says the fix
            err.hint && !(resumable && err.kind === "interrupted") ? el("div", { className: "clora-fix clora-small", attrs: { "data-clora": "fix" }, text: "Fix: " + err.hint }) : null,
            resumable ? p.resumeError : null
        )
    }
    ui.jobParts = p
    ui.jobPanel.replaceChildren(
        el("h4", {}, icon("fa-chart-line"), "Training"),
        el("div", { className: "clora-job-title" }, el("div", {}, el("b", { text: job.name }), " ", el("span", { className: "clora-small", text: "trigger “" + job.trigger + "”, " + (job.image_count || "?") + " pictures" })), p.badge),
        p.settings,
        p.recovery,
        p.bar,
        p.stats,
        p.chart.box,
        p.samples,
        p.epochs,
        p.log,
        ...(result ? [result] : []),
        p.actions
    )
}
/** Resume: POST /jobs/{id}/resume; the job is queued again and the panel follows it as any other run. */
function resumeButton(job, p) {
    const btn = el("button", { className: "primaryButton", attrs: { type: "button", "data-clora": "resume", title: resumePlan(job) } }, icon("fa-play"), " Resume")
    btn.addEventListener("click", async () => {
        const said = p.resumeError
        said.textContent = ""
        btn.disabled = true
        btn.lastChild.textContent = " Resuming…"
        try {
            const j = await client.request("POST", "/jobs/" + encodeURIComponent(job.id) + "/resume", null, { timeoutMs: 30000 })
            if (j && j.id) upsertJob(j)
        } catch (e) {
            // the daemon's sentence (e.g. the queue is full, the job is not interrupted any more) where it was asked
            const text = "Could not resume: " + e.message + (e.hint ? " " + e.hint : "")
            if (said.isConnected) said.textContent = text
            else toast(text, true) // the panel shows another job by now
            btn.disabled = false
            btn.lastChild.textContent = " Resume"
        }
        scheduleRender()
    })
    return btn
}
/** Out-of-memory retry (prominent while it runs), the other recovery sentences, and the saved state's size. */
function updateRecovery(job, p) {
    const retry = activeRetry(job)
    const notices = listedNotices(job)
    const size = stateSizeText(job)
    const key = JSON.stringify([retry && retry.message, notices, size])
    if (key === p.recoveryKey) return
    p.recoveryKey = key
    const parts = []
    if (retry) {
        parts.push(el("div", { className: "clora-retry", attrs: { "data-clora": "oom-retry", role: "status" } }, icon("fa-triangle-exclamation"), " ", retry.message))
    }
    if (notices.length) {
        parts.push(el("ul", { className: "clora-notices clora-small", attrs: { "data-clora": "notices" } }, notices.map((n) => el("li", { attrs: { "data-clora": "notice" }, text: n }))))
    }
    if (size) {
        parts.push(el("div", { className: "clora-small", attrs: { "data-clora": "state-size", title: "Disk used by kohya's saved training state, kept so that the job can resume; deleted when the job ends or is removed" }, text: size }))
    }
    p.recovery.replaceChildren(...parts)
    p.recovery.hidden = !parts.length
}
// The daemon's progress.phase values before the first step (daemon/pipeline/progress.py PREP_PHASES).
const START_PHASES = {
    loading_model: "loading the model",
    caching_latents: "caching pictures",
    caching_text_encoder_outputs: "caching captions",
    creating_lora: "creating the LoRA",
}
export function updateJobPanel(job) {
    const p = ui.jobParts
    if (!p) return
    const settings = jobSettingsText(job)
    if (p.settings.textContent !== settings) p.settings.textContent = settings
    const why = (job.params && job.params.fit_reason) || ""
    if (p.settings.title !== why) p.settings.title = why // the daemon's reason for the tier, as the form showed it
    const pr = job.progress || {}
    const total = pr.total || 0
    const step = pr.step || 0
    let pct = total ? Math.min(100, (100 * step) / total) : 0
    if (job.state === "done") pct = 100
    p.bar.firstChild.style.width = pct.toFixed(1) + "%"
    p.bar.setAttribute("aria-valuenow", pct.toFixed(0))
    p.step.textContent = total ? step + " / " + total : step ? String(step) : "–"
    p.epoch.textContent = pr.epochs ? (pr.epoch || 0) + " / " + pr.epochs : pr.epoch ? String(pr.epoch) : "–"
    p.loss.textContent = typeof pr.loss === "number" ? pr.loss.toFixed(4) : "–"
    // kohya makes no steps while it draws the previews: say so rather than show a rate that seems stuck.
    // The rate itself is tqdm's, which leaves the preview time out (sd-scripts unpauses its bar after them).
    const previewing = job.state === "training" && pr.phase === "preview"
    // kohya's start-up (minutes for SDXL on a small card) is said as it goes, not shown as a stalled rate
    const starting = job.state === "training" && START_PHASES[pr.phase]
    const counted = starting && pr.prep_total ? " " + (pr.prep_done || 0) + "/" + pr.prep_total : ""
    p.rate.textContent = previewing ? "making preview…" : starting ? START_PHASES[pr.phase] + counted + "…" : fmtRate(pr.rate)
    p.rate.dataset.phase = previewing ? "preview" : starting ? pr.phase : "training"
    p.rate.title = previewing ? "kohya is drawing the preview pictures; training goes on after them"
        : starting ? "kohya gets ready before its first training step" : ""
    // a resumed run's step and time left count from where it continues: the daemon adds the offset
    p.eta.textContent = isFinished(job) ? "–" : fmtDuration(pr.eta_s)
    updateRecovery(job, p)
    updateSamples(job, p)
    const series = ensureLoss(job.id)
    if (series.total == null && pr.total) series.total = pr.total
    updateLossChart(p.chart, series)
    if (wantsCheckpoints(job)) loadCheckpoints(job.id)
    updateEpochGallery(job, p, saved.get(job.id), losses.get(job.id))
    const lines = job.logs || []
    const text = lines.join("\n")
    if (p.log.textContent !== text) {
        const atBottom = p.log.scrollHeight - p.log.scrollTop - p.log.clientHeight < 24
        p.log.textContent = text
        if (atBottom) p.log.scrollTop = p.log.scrollHeight
    }
}
