// The list of jobs with their state and result.
import { STATE_LABELS } from "../constants.js"
import { el, icon, toast } from "../dom.js"
import { fmtTime, isFinished } from "../format.js"
import { client, sortedJobs, selectedJob, selectJob, forgetJob } from "../store.js"
import { ui } from "./ui.js"
import { useLora } from "../use-lora.js"
import { jobArchLabel } from "../job-info.js"

export function renderJobList() {
    if (!ui.jobList) return
    const jobs = sortedJobs().slice(0, 30)
    const current = selectedJob()
    const head = el("h4", {}, icon("fa-list"), "Recent jobs")
    if (!jobs.length) {
        ui.jobList.replaceChildren(head, el("div", { className: "clora-empty", text: "No jobs yet." }))
        return
    }
    const rows = jobs.map((job) => {
        let result = ""
        if (job.state === "done") result = job.lora_id || ""
        else if (job.error && job.error.message) result = job.error.message
        else if (!isFinished(job) && job.progress && job.progress.total) result = Math.floor((100 * (job.progress.step || 0)) / job.progress.total) + "%"
        const del = isFinished(job)
            ? el(
                  "button",
                  {
                      className: "tertiaryButton",
                      attrs: { type: "button", title: "Remove from the list (the LoRA file stays)", "aria-label": "Remove job " + job.name },
                      on: {
                          click: async (e) => {
                              e.stopPropagation()
                              try {
                                  await client.request("DELETE", "/jobs/" + encodeURIComponent(job.id))
                                  forgetJob(job.id)
                              } catch (err) {
                                  toast("Could not remove the job: " + err.message, true)
                              }
                          },
                      },
                  },
                  icon("fa-trash-can")
              )
            : null
        const useBtn =
            job.state === "done" && job.lora_id
                ? el("button", { className: "tertiaryButton", attrs: { type: "button", title: "Use it" }, on: { click: (e) => { e.stopPropagation(); useLora(job) } } }, icon("fa-wand-magic-sparkles"))
                : null
        const tr = el(
            "tr",
            { className: "clora-row" + (current && current.id === job.id ? " clora-selected" : ""), attrs: { "data-job-id": job.id, "data-clora": "job-row" } },
            el("td", {}, el("div", { text: job.name }), el("div", { className: "clora-small" }, job.trigger + " · ", el("span", { attrs: { "data-clora": "job-arch" }, text: jobArchLabel(job) }))),
            el("td", {}, el("span", { className: "clora-badge", attrs: { "data-state": job.state }, text: STATE_LABELS[job.state] || job.state })),
            el("td", { className: "clora-small", text: result, attrs: { title: result } }),
            el("td", { className: "clora-small", text: fmtTime(job.created_at) }),
            el("td", { style: { whiteSpace: "nowrap", textAlign: "right" } }, useBtn, " ", del)
        )
        tr.addEventListener("click", () => {
            selectJob(job.id)
        })
        return tr
    })
    ui.jobList.replaceChildren(
        head,
        el("table", { className: "clora-jobs" }, el("thead", {}, el("tr", {}, el("th", { text: "Character" }), el("th", { text: "State" }), el("th", { text: "Result" }), el("th", { text: "Started" }), el("th"))), el("tbody", {}, rows))
    )
}
