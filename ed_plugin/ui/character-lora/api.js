// The daemon client: one object for every HTTP call to the training daemon. Failures are DaemonError, typed by
// `kind` ("network": no answer; "http": an answer with a status, the daemon's sentence, hint and key).
import { DaemonSocket } from "./socket.js"

export class DaemonError extends Error {
    constructor(message, { status = 0, hint = null, key = null, kind = "http" } = {}) {
        super(message)
        this.status = status
        this.hint = hint
        this.key = key
        this.kind = kind // "http" | "network"
    }
}

/** The daemon's HTTP API (JSON, bearer token) plus its WebSocket (`socket`, see socket.js). */
export class DaemonClient {
    constructor() {
        this.url = null
        this.token = null
        this.socket = new DaemonSocket(() => ({ url: this.url, token: this.token }))
    }

    configure(url, token) {
        const changed = url !== this.url || token !== this.token
        this.url = url ? url.replace(/\/+$/, "") : null
        this.token = token || null
        if (changed && this.socket.ws) this.socket.close()
    }

    async request(method, path, body, { auth = true, timeoutMs = 15000 } = {}) {
        if (!this.url) throw new DaemonError("The daemon's address is not known.", { kind: "network" })
        const headers = {}
        if (auth && this.token) headers["Authorization"] = "Bearer " + this.token
        let payload = body
        if (body && !(body instanceof FormData)) {
            headers["Content-Type"] = "application/json"
            payload = JSON.stringify(body)
        }
        const ctrl = typeof AbortController !== "undefined" ? new AbortController() : null
        const timer = ctrl ? setTimeout(() => ctrl.abort(), timeoutMs) : null
        let res
        try {
            res = await fetch(this.url + path, {
                method,
                headers,
                body: payload,
                mode: "cors",
                cache: "no-store",
                signal: ctrl ? ctrl.signal : undefined,
            })
        } catch (e) {
            throw new DaemonError("The daemon at " + this.url + " cannot be reached.", { kind: "network" })
        } finally {
            if (timer) clearTimeout(timer)
        }
        let data = null
        try {
            data = await res.json()
        } catch (e) {
            data = null
        }
        if (!res.ok) {
            const msg = (data && data.error) || "The daemon answered " + res.status + " " + res.statusText + "."
            throw new DaemonError(msg, { status: res.status, hint: data && data.hint, key: data && data.key })
        }
        return data
    }

    /** GET a binary file (a preview picture) with the token; an <img src> could not send it. */
    async blob(path, { timeoutMs = 30000 } = {}) {
        if (!this.url) throw new DaemonError("The daemon's address is not known.", { kind: "network" })
        const headers = this.token ? { Authorization: "Bearer " + this.token } : {}
        const ctrl = typeof AbortController !== "undefined" ? new AbortController() : null
        const timer = ctrl ? setTimeout(() => ctrl.abort(), timeoutMs) : null
        try {
            let res
            try {
                res = await fetch(this.url + path, { headers, mode: "cors", signal: ctrl ? ctrl.signal : undefined })
            } catch (e) {
                throw new DaemonError("The daemon at " + this.url + " cannot be reached.", { kind: "network" })
            }
            if (!res.ok) {
                const data = await res.json().catch(() => null)
                throw new DaemonError((data && data.error) || "The daemon answered " + res.status + ".", { status: res.status })
            }
            return await res.blob()
        } finally {
            if (timer) clearTimeout(timer)
        }
    }
}
