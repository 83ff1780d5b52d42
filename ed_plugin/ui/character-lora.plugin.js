/*
    Character LoRA One-Click: the "Train character LoRA" tab for Easy Diffusion (the loader).

    Installed by install_plugin.py into <ED root>/plugins/ui/. ED runs this classic script; it imports the tab's
    ES modules (ed_plugin/ui/character-lora/*.js, installed into <ED root>/plugins/ui/character-lora/) from the
    route /character-lora/ui/ that the companion server plugin adds to ED's server. No build step.
    When that import fails (most often: ED was not restarted after the install, so the server plugin is not
    loaded), the tab still appears and says so in one sentence.

    The only global this file defines is window.CharacterLoRA (version, state, and a few hooks, filled in by
    main.js).
*/
;(function () {
    "use strict"

    if (window.CharacterLoRA && window.CharacterLoRA.loaded) {
        return // loaded twice (e.g. a plugin manager copy and the file): keep the first
    }
    const ENTRY = "/character-lora/ui/main.js"
    const TAB_ID = "character-lora"
    const LOAD_FAILED =
        "The Train character LoRA tab could not load its code from Easy Diffusion's server " +
        "(" + ENTRY + "): restart Easy Diffusion so that it loads the Character LoRA server plugin, then reload this page."
    const loader = { loaded: true, version: "0.1.0", modules: "loading", loadError: null, tab: { onOpen: null } }
    window.CharacterLoRA = loader

    /** The tab's placeholder, made as soon as ED's createTab exists (so the tab takes its place among the other
     * plugins' tabs at once); main.js replaces the placeholder with the tab's content. */
    function makeTab() {
        let create
        try {
            create = typeof createTab === "function" ? createTab : undefined
        } catch (e) {
            create = undefined
        }
        if (!create || !document.getElementById("tab-container") || !document.getElementById("tab-content-wrapper")) return false
        if (document.getElementById("tab-" + TAB_ID)) return true
        const placeholder = document.createElement("p")
        placeholder.setAttribute("data-clora", "loading")
        placeholder.textContent = "Loading the Train character LoRA tab…"
        create({
            id: TAB_ID,
            icon: "fa-user-gear",
            label: "Train character LoRA",
            content: placeholder,
            onOpen: () => {
                if (loader.tab.onOpen) loader.tab.onOpen()
                return undefined
            },
        })
        return true
    }

    function showLoadFailure() {
        const inner = document.getElementById(TAB_ID)
        if (!inner) return false
        const note = document.createElement("p")
        note.setAttribute("data-clora", "load-error")
        note.setAttribute("role", "alert")
        note.textContent = LOAD_FAILED
        inner.replaceChildren(note)
        return true
    }

    // ED runs plugins after its own scripts, but plugin managers may eval us earlier: wait for createTab.
    if (!makeTab()) {
        let tries = 0
        const timer = setInterval(() => {
            tries += 1
            if (makeTab() || tries > 600) clearInterval(timer)
        }, 100)
    }

    import(ENTRY).then(
        () => {
            loader.modules = "ready"
        },
        (err) => {
            loader.modules = "failed"
            loader.loadError = String((err && err.message) || err)
            console.error("[Character LoRA]", LOAD_FAILED, err)
            if (!showLoadFailure()) {
                let tries = 0
                const timer = setInterval(() => {
                    tries += 1
                    if (showLoadFailure() || tries > 600) clearInterval(timer)
                }, 100)
            }
        }
    )
})()
