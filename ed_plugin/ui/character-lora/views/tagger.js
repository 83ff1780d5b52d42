// The "Automatic tags" box under the pictures: start (or why not), progress and cancel, then the tag picker and
// what each caption becomes. Each part is rebuilt only when what it shows changes, so a click is never lost to
// a redraw.
import { el, icon } from "../dom.js"
import { state, subscribe } from "../store.js"
import { ui } from "./ui.js"
import { tagger, loadReadiness, startTagging, cancelTagging, setKeep, setThreshold, isRunning, untaggedCount, DEFAULT_THRESHOLD } from "../tagger.js"

const PHASES = {
    uploading: "Sending the pictures…",
    preparing: "Preparing the pictures…",
    starting: "Starting kohya's tagger…",
    downloading: "Downloading the tagger model (first use only; a few hundred MB)…",
    tagging: "Tagging",
}

export function taggerBox() {
    ui.taggerStart = el("button", { className: "secondaryButton", attrs: { type: "button", "data-clora": "tagger-start" }, on: { click: () => startTagging() } }, icon("fa-tags"), " Automatic tags")
    ui.taggerThreshold = el("input", {
        attrs: { id: "clora-tagger-threshold", type: "number", min: 0.1, max: 0.9, step: 0.05, value: DEFAULT_THRESHOLD, "data-clora": "tagger-threshold", title: "How sure the tagger must be to give a tag (0.1–0.9; lower gives more tags)" },
        on: { change: (e) => setThreshold(e.target.value) },
    })
    ui.taggerReason = el("span", { className: "clora-reason", attrs: { "data-clora": "tagger-reason" } })
    ui.taggerNote = el("div", { className: "clora-help", attrs: { "data-clora": "tagger-note" } })
    ui.taggerStatus = el("div", { attrs: { "data-clora": "tagger-status", "aria-live": "polite" } })
    ui.taggerPicker = el("div", { attrs: { "data-clora": "tagger-picker", hidden: true } })
    ui.taggerCaptions = el("details", { className: "clora-tagger-captions", attrs: { "data-clora": "tagger-captions", hidden: true } })
    ui.tagger = el(
        "div",
        { className: "clora-tagger", attrs: { "data-clora": "tagger" } },
        el("div", { className: "clora-tagger-head" }, ui.taggerStart, el("label", { attrs: { for: ui.taggerThreshold.id } }, "Threshold"), ui.taggerThreshold, ui.taggerReason),
        ui.taggerNote,
        ui.taggerStatus,
        ui.taggerPicker,
        ui.taggerCaptions
    )
    return ui.tagger
}

const drawn = { head: null, status: null, picker: null, captions: null, health: null }

function changed(part, key) {
    if (drawn[part] === key) return false
    drawn[part] = key
    return true
}

function whyNot() {
    if (state.health !== "ok") return "Connect to the daemon first."
    if (tagger.readyError) return tagger.readyError
    if (!tagger.ready) return "Asking the daemon whether the tagger can run…"
    if (!tagger.ready.available) {
        const p = (tagger.ready.problems || [])[0] || {}
        return (p.title ? p.title + ": " : "") + (p.detail || "the tagger cannot run") + ". " + (p.fix || "")
    }
    if (!state.images.length) return "Add pictures first."
    return ""
}

function renderHead() {
    const reason = isRunning() ? "" : whyNot()
    const cached = tagger.ready && tagger.ready.available ? tagger.ready.model_cached : null
    if (!changed("head", JSON.stringify([reason, cached, isRunning()]))) return
    ui.taggerStart.disabled = !!reason || isRunning()
    ui.taggerStart.title = reason || "Tag every picture with kohya's WD14 tagger, then choose the tags to keep"
    ui.taggerReason.textContent = reason
    ui.taggerNote.textContent =
        cached === false
            ? "The first use downloads the tagger model (" + tagger.ready.repo_id + ", a few hundred MB): this computer needs internet once."
            : ""
}

function renderStatus() {
    const run = tagger.run
    const untagged = tagger.result ? untaggedCount() : 0
    const key = JSON.stringify([run && [run.phase, run.done, run.total, !!run.task_id], tagger.error, tagger.notice, untagged])
    if (!changed("status", key)) return
    const parts = []
    if (run) {
        const text = run.phase === "tagging" ? "Tagging: " + run.done + " / " + run.total + " pictures" : PHASES[run.phase] || "Working…"
        const bar = el("progress", { attrs: { max: run.total, "data-clora": "tagger-bar" } })
        if (run.phase === "tagging") bar.value = run.done // else indeterminate
        parts.push(
            el(
                "div",
                { className: "clora-tagger-progress", attrs: { "data-clora": "tagger-progress", "data-phase": run.phase } },
                bar,
                el("span", { text }),
                el("button", { className: "tertiaryButton", attrs: { type: "button", "data-clora": "tagger-cancel" }, on: { click: () => cancelTagging() } }, icon("fa-xmark"), " Cancel")
            )
        )
    }
    if (tagger.error) parts.push(el("div", { className: "clora-err", text: tagger.error, attrs: { "data-clora": "tagger-error", role: "alert" } }))
    if (tagger.notice) parts.push(el("div", { className: "clora-help", text: tagger.notice, attrs: { "data-clora": "tagger-notice" } }))
    if (untagged) parts.push(el("div", { className: "clora-help", text: untagged + " picture" + (untagged === 1 ? " was" : "s were") + " added after the tagging and " + (untagged === 1 ? "has" : "have") + " no tags: run it again to tag them." }))
    ui.taggerStatus.replaceChildren(...parts)
}

function renderPicker() {
    const result = tagger.result
    if (!changed("picker", result)) return // a new result object: a new list; the checkboxes keep their own state
    ui.taggerPicker.hidden = !result
    if (!result) {
        ui.taggerPicker.replaceChildren()
        return
    }
    const items = result.tags.map((t) => {
        const box = el("input", { attrs: { type: "checkbox", "data-tag": t.tag }, on: { change: (e) => onToggle(t.tag, e.target.checked) } })
        box.checked = tagger.keep.get(t.tag) !== false
        return el(
            "label",
            { className: "clora-tag" + (t.suggest_drop ? " clora-tag-suggested" : ""), attrs: { "data-clora": "tagger-tag", "data-tag": t.tag, "data-suggested": String(t.suggest_drop) } },
            box,
            el("span", { text: t.tag }),
            el("span", { className: "clora-tag-count", text: "×" + t.count, attrs: { title: "on " + t.count + " of " + result.ids.length + " pictures" } })
        )
    })
    ui.taggerPicker.replaceChildren(
        el("div", { className: "clora-help", text: result.rule, attrs: { "data-clora": "tagger-rule" } }),
        result.tags.length ? el("div", { className: "clora-tags" }, ...items) : el("div", { className: "clora-empty", text: "The tagger found no tags above the threshold." })
    )
}

function onToggle(tag, kept) {
    setKeep(tag, kept)
}

function renderCaptions() {
    const tagged = tagger.result ? state.images.filter((img) => Array.isArray(img.tags)) : []
    const key = JSON.stringify(tagged.map((img) => [img.id, img.caption]))
    if (!changed("captions", key)) return
    ui.taggerCaptions.hidden = !tagged.length
    ui.taggerCaptions.replaceChildren(
        el("summary", { text: "What each caption becomes (after the trigger and class word)" }),
        el(
            "ol",
            {},
            ...tagged.map((img) => el("li", { attrs: { "data-clora": "tagger-caption", "data-image": img.id } }, el("span", { className: "clora-small", text: img.file.name + ": " }), el("span", { text: img.caption || "(nothing added)" })))
        )
    )
}

export function renderTagger() {
    if (!ui.tagger) return
    if (state.health === "ok" && drawn.health !== "ok") {
        // connected (again): the daemon, its config or its model cache may have changed meanwhile
        tagger.ready = null
        tagger.readyError = null
        loadReadiness()
    }
    drawn.health = state.health
    renderHead()
    renderStatus()
    renderPicker()
    renderCaptions()
}

subscribe(() => ui.root && renderTagger())
