// The preview pictures of the job in the panel (fetched with the token as blobs), the full-size viewer, and the
// saved epochs: each with its previews, loss and size, "Publish this epoch" and then "Use it".
import { SAMPLE_NAME_RE } from "../constants.js"
import { el, icon } from "../dom.js"
import { isFinished } from "../format.js"
import { client } from "../store.js"
import { ui } from "./ui.js"
import { fmtBytes } from "../recovery.js"
import { epochMean } from "../loss-series.js"
import { publishEpoch, publishing, useEpoch } from "../checkpoints.js"
import { finishing, useLora } from "../use-lora.js"

// The daemon serves previews only with the token, so each is fetched as a blob and shown through an
// object URL. Cached by URL for the job in the panel (a redraw reuses it); revoked when it leaves.
export const sampleCache = new Map() // daemon url + sample url -> {jobId, url, status, objectUrl, error, dead}
export function sampleLabel(file) {
    const m = SAMPLE_NAME_RE.exec(file || "")
    if (!m) return file || "?"
    const idx = parseInt(m[2], 10)
    return "epoch " + parseInt(m[1], 10) + (idx > 0 ? " #" + (idx + 1) : "")
}
export function sampleKey(url) {
    return (client.url || "") + url
}
/** The cache entry for a preview, fetching it the first time (or again after a failure, on `retry`). */
export function loadSample(jobId, url, { retry = false } = {}) {
    const key = sampleKey(url)
    const have = sampleCache.get(key)
    if (have && !(retry && have.status === "error")) return have
    const entry = { jobId, url, status: "loading", objectUrl: null, error: null, dead: false }
    sampleCache.set(key, entry)
    client
        .blob(url)
        .then((blob) => {
            if (entry.dead) return
            entry.objectUrl = URL.createObjectURL(blob)
            entry.status = "ok"
        })
        .catch((e) => {
            if (entry.dead) return
            entry.status = "error"
            entry.error = e.message
        })
        .finally(() => {
            if (entry.dead) return
            const node = ui.jobParts && ui.jobParts.sampleNodes && ui.jobParts.sampleNodes.get(url)
            if (node) paintSample(node, entry)
            const small = ui.jobParts && ui.jobParts.epochSampleNodes && ui.jobParts.epochSampleNodes.get(url)
            if (small) paintSample(small, entry)
        })
    return entry
}
/** Forget (and revoke) every cached preview that is not the given job's. */
export function pruneSamples(keepJobId) {
    for (const [key, entry] of Array.from(sampleCache.entries())) {
        if (entry.jobId === keepJobId) continue
        entry.dead = true
        if (entry.objectUrl) URL.revokeObjectURL(entry.objectUrl)
        sampleCache.delete(key)
    }
}
export function paintSample(node, entry) {
    node.btn.dataset.status = entry.status
    if (entry.status === "ok" && node.img.getAttribute("src") !== entry.objectUrl) node.img.src = entry.objectUrl
    if (entry.status === "error") node.btn.title = node.label + ": could not load it (" + entry.error + "). Click to try again."
    else node.btn.title = node.label + " (" + node.file + "), click to enlarge"
}
/** A preview's button; `kind` names it for the tests ("sample" in the strip, "epoch-sample" in an epoch's card). */
export function makeSampleNode(job, sample, kind = "sample") {
    const label = sampleLabel(sample.file)
    const img = el("img", { attrs: { alt: "Preview, " + label, draggable: "false", "data-clora": kind + "-img" } })
    const btn = el(
        "button",
        { className: "clora-sample", attrs: { type: "button", "data-clora": kind, "data-file": sample.file } },
        el("span", { className: "clora-sample-pic" }, img),
        el("span", { className: "clora-sample-label", text: label })
    )
    const node = { btn, img, label, file: sample.file }
    btn.addEventListener("click", () => {
        const entry = loadSample(job.id, sample.url)
        if (entry.status === "ok") openViewer(node, entry)
        else if (entry.status === "error") paintSample(node, loadSample(job.id, sample.url, { retry: true }))
    })
    paintSample(node, loadSample(job.id, sample.url))
    return node
}
/** The job's previews, oldest first, the newest larger; a note while none came yet. */
export function updateSamples(job, p) {
    if (!p.samples) return
    const samples = Array.isArray(job.samples) ? job.samples.filter((s) => s && s.url) : []
    const every = (job.params && Number(job.params.sample_every_n_epochs)) || 0
    const key = samples.map((s) => s.url).join("\n") + "|" + every + "|" + isFinished(job)
    if (key === p.samplesKey) return
    p.samplesKey = key
    if (!samples.length) {
        p.sampleNodes.clear()
        const waiting = every > 0 && !isFinished(job)
        p.samples.hidden = !waiting
        p.samples.replaceChildren(
            ...(waiting
                ? [el("div", { className: "clora-empty", attrs: { "data-clora": "samples-note" }, text: every === 1 ? "Preview pictures appear every epoch." : "Preview pictures appear every " + every + " epochs." })]
                : [])
        )
        return
    }
    let strip = p.samples.querySelector(".clora-sample-strip")
    const head = el(
        "div",
        { className: "clora-samples-head" },
        icon("fa-images"),
        " Preview pictures (" + samples.length + ")" + (every > 0 && !isFinished(job) ? " · every " + (every === 1 ? "epoch" : every + " epochs") : "") + " · click one to enlarge"
    )
    const atEnd = !strip || strip.scrollWidth - strip.scrollLeft - strip.clientWidth < 24
    if (!strip) strip = el("div", { className: "clora-sample-strip", attrs: { "data-clora": "sample-strip" } })
    const nodes = samples.map((s, i) => {
        let node = p.sampleNodes.get(s.url)
        if (!node) {
            node = makeSampleNode(job, s)
            p.sampleNodes.set(s.url, node)
        }
        node.btn.classList.toggle("clora-latest", i === samples.length - 1)
        return node.btn
    })
    strip.replaceChildren(...nodes)
    p.samples.hidden = false
    p.samples.replaceChildren(head, strip)
    if (atEnd) strip.scrollLeft = strip.scrollWidth // keep the newest in view
}
export function openViewer(node, entry) {
    closeViewer()
    const viewer = el(
        "div",
        { className: "clora-viewer", attrs: { role: "dialog", "aria-modal": "true", "aria-label": "Preview picture, " + node.label, tabindex: "-1", "data-clora": "viewer" } },
        el("img", { attrs: { src: entry.objectUrl, alt: "Preview, " + node.label, "data-clora": "viewer-img" } }),
        el("div", { className: "clora-viewer-caption" }, el("b", { text: node.label }), " ", el("span", { text: node.file }), el("span", { className: "clora-viewer-hint", text: "Click or press Esc to close" }))
    )
    viewer.addEventListener("click", () => closeViewer())
    ui.viewer = viewer
    ui.viewerOpener = node.btn
    ui.root.appendChild(viewer)
    document.addEventListener("keydown", onViewerKey, true)
    viewer.focus()
}
export function onViewerKey(e) {
    if (e.key !== "Escape") return
    e.preventDefault()
    e.stopPropagation() // ED's own Esc handlers must not act on it
    closeViewer()
}
export function closeViewer() {
    if (!ui.viewer) return
    document.removeEventListener("keydown", onViewerKey, true)
    ui.viewer.remove()
    ui.viewer = null
    const opener = ui.viewerOpener
    ui.viewerOpener = null
    if (opener && opener.isConnected) opener.focus()
}

/** The previews of each epoch (kohya's names carry it), from the job's list: live as `sample` frames come. */
export function samplesByEpoch(job) {
    const out = new Map()
    for (const s of Array.isArray(job.samples) ? job.samples : []) {
        const m = s && s.url ? SAMPLE_NAME_RE.exec(s.file || "") : null
        if (!m) continue
        const epoch = parseInt(m[1], 10)
        if (!out.has(epoch)) out.set(epoch, [])
        out.get(epoch).push(s)
    }
    return out
}
/** The saved epochs of the job in the panel (`saved`: checkpoints.js's entry, `series`: its loss history). */
export function updateEpochGallery(job, p, saved, series) {
    if (!p.epochs) return
    const rows = (saved && saved.rows) || []
    const byEpoch = samplesByEpoch(job)
    const busy = rows.map((r) => publishing.get(job.id + "|" + r.epoch) || null)
    const points = (series && series.points) || []
    const key = JSON.stringify([rows, saved && saved.bytes, busy, job.samples, job.state, job.lora_id, finishing.has(job.id),
        rows.some((r) => r.loss == null) ? points.length : 0])
    if (key === p.epochsKey) return
    p.epochsKey = key
    if (!rows.length) {
        p.epochs.hidden = true
        p.epochs.replaceChildren()
        return
    }
    const every = (job.params && Number(job.params.save_every_n_epochs)) || 0
    const head = el(
        "div",
        { className: "clora-samples-head" },
        icon("fa-layer-group"),
        " Saved epochs (" + rows.length + ") · ",
        el("span", { attrs: { "data-clora": "epochs-bytes", title: "Disk used by the saved epoch files; they stay until the job is deleted" }, text: fmtBytes(saved.bytes) + " on disk" }),
        every > 0 && !isFinished(job) ? " · every " + (every === 1 ? "epoch" : every + " epochs") : ""
    )
    const keep = new Map()
    const cards = rows.map((row, i) => epochCard(job, p, row, byEpoch.get(row.epoch) || [], busy[i], points, keep))
    p.epochSampleNodes = keep
    p.epochs.hidden = false
    p.epochs.replaceChildren(head, el("div", { className: "clora-epoch-list" }, cards))
}
function epochCard(job, p, row, samples, busy, points, keep) {
    const pics = samples.map((s) => {
        let node = (p.epochSampleNodes && p.epochSampleNodes.get(s.url)) || keep.get(s.url)
        if (!node) node = makeSampleNode(job, s, "epoch-sample")
        keep.set(s.url, node)
        return node.btn
    })
    const loss = typeof row.loss === "number" ? row.loss : epochMean(points, row.epoch)
    // a list fetched while this tab's publish still refreshes ED's models must not offer "Use it" early
    const published = busy === true ? null : row.published
    const ownFinal = row.final && job.state === "done" && published && published.lora_id === job.lora_id
    const actions = []
    if (published) {
        const use = el("button", { className: ownFinal ? "tertiaryButton" : "primaryButton", attrs: { type: "button", "data-clora": "epoch-use", title: "Select " + published.lora_id + " in Easy Diffusion and add the trigger word to the prompt" } }, icon("fa-wand-magic-sparkles"), " Use it")
        use.disabled = finishing.has(job.id)
        use.addEventListener("click", () => (ownFinal ? useLora(job) : useEpoch(job, published)))
        actions.push(el("span", { className: "clora-small", attrs: { "data-clora": "epoch-published" } }, ownFinal ? "the job's LoRA " : "published as ", el("code", { text: published.lora_id })), use)
    } else {
        const btn = el("button", { className: "tertiaryButton", attrs: { type: "button", "data-clora": "epoch-publish", title: "Copy this epoch into Easy Diffusion's LoRA folder under its own name" } }, icon("fa-upload"), busy === true ? " Publishing…" : " Publish this epoch")
        btn.disabled = busy === true
        btn.addEventListener("click", () => publishEpoch(job, row.epoch))
        actions.push(btn)
    }
    const error = busy && busy.error ? el("div", { className: "clora-err", attrs: { "data-clora": "epoch-error", role: "alert" }, text: busy.error }) : null
    return el(
        "div",
        { className: "clora-epoch" + (row.final ? " clora-epoch-final" : ""), attrs: { "data-clora": "epoch-card", "data-epoch": String(row.epoch) } },
        el(
            "div",
            { className: "clora-epoch-head" },
            el("b", { text: "Epoch " + row.epoch + (row.final ? " (final)" : "") }),
            el("span", { className: "clora-small", attrs: { "data-clora": "epoch-loss", title: "Mean loss over this epoch's steps" }, text: loss == null ? "loss –" : "loss " + loss.toFixed(4) }),
            el("span", { className: "clora-small", attrs: { "data-clora": "epoch-size" }, text: fmtBytes(row.bytes) })
        ),
        pics.length ? el("div", { className: "clora-epoch-pics" }, pics) : el("div", { className: "clora-small clora-epoch-nopic", text: "no preview for this epoch" }),
        el("div", { className: "clora-actions" }, actions),
        error
    )
}
