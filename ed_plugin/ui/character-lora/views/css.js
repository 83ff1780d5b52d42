// The tab's style sheet (main.js adds it where ED's createTab puts a tab's css).
import { TAB_ID } from "../constants.js"

export const CSS = `
/* ED's #server-status sits position:absolute at the right of #top-nav and takes no room, so a tab strip that
   grows (ours adds a tab) runs under it: keep the status's corner free and let the tabs take a second row. */
#top-nav { padding-right: 240px; }
#top-nav #tab-container { flex-wrap: wrap; row-gap: 4px; min-width: 0; }
#top-nav #tab-container > .tab { white-space: nowrap; }
@media screen and (max-width: 700px) { #top-nav { padding-right: 0; } }
/* ED's .primaryButton is \`flex: 0 0 70px\`: in our flex rows "Start training" and "Use it" would wrap */
.clora-root button { white-space: nowrap; }
.clora-root .clora-start > button, .clora-root .clora-actions > button, .clora-header button { flex: none; }
#${TAB_ID}.tab-content-inner { max-width: 1180px; text-align: left; }
.clora-root { display: flex; flex-direction: column; gap: 12px; }
.clora-header { display: flex; align-items: center; justify-content: space-between; gap: 8px; flex-wrap: wrap; }
.clora-header h3 { margin: 0; font-weight: normal; min-width: 0; }
.clora-conn { font-size: 9pt; color: var(--small-label-color, #999); }
.clora-conn .clora-dot { display: inline-block; width: 8px; height: 8px; border-radius: 50%; margin-right: 5px; background: var(--status-orange, orange); }
.clora-conn[data-status="live"] .clora-dot { background: var(--status-green, green); }
.clora-conn[data-status="offline"] .clora-dot { background: var(--status-red, red); }
.clora-banner { border-radius: 7px; padding: 10px 12px; border: 1px solid var(--status-red, red); background: var(--background-color3); }
.clora-banner.clora-waiting { border-color: var(--status-orange, orange); }
.clora-banner h4 { margin: 0 0 6px 0; }
.clora-banner ul { margin: 0 0 8px 0; padding-left: 18px; }
.clora-banner li { margin-bottom: 6px; }
.clora-banner .clora-fix { display: block; color: var(--small-label-color, #aaa); font-size: 10pt; margin-top: 2px; word-break: break-word; }
.clora-banner button { margin-right: 6px; }
.clora-columns { display: grid; grid-template-columns: minmax(320px, 1fr) minmax(320px, 1fr); gap: 12px; align-items: start; }
@media (max-width: 900px) { .clora-columns { grid-template-columns: 1fr; } }
.clora-root .panel-box { margin-bottom: 0; padding: 10px 12px; }
.clora-root .panel-box > h4 { margin: 0 0 10px 0; display: flex; align-items: center; gap: 6px; }
.clora-field { display: grid; grid-template-columns: 120px 1fr; gap: 2px 10px; align-items: center; margin-bottom: 8px; }
.clora-field > label { text-align: right; }
.clora-field input, .clora-field select, .clora-adv input, .clora-adv select {
width: 100%; padding: 4px 6px; color: var(--input-text-color);
background: var(--input-background-color); border: var(--input-border-size, 1px) solid var(--input-border-color);
border-radius: var(--input-border-radius, 4px); font-size: 10pt; }
.clora-field input[aria-invalid="true"] { border-color: var(--status-red, red); }
.clora-help, .clora-err, .clora-arch, .clora-fit { grid-column: 2; font-size: 9pt; min-height: 0; }
.clora-help, .clora-arch, .clora-fit { color: var(--small-label-color, #999); }
.clora-fit { min-height: 2.6em; }
.clora-fit[hidden] { display: none; }
.clora-fit.clora-warn { color: var(--status-orange, orange); }
.clora-err { color: #ff6b6b; }
.clora-err:empty, .clora-help:empty { display: none; }
.clora-arch.clora-warn { color: var(--status-orange, orange); }
.clora-root details { margin: 4px 0 10px 0; }
.clora-root summary { cursor: pointer; color: var(--small-label-color, #aaa); }
.clora-adv { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 8px; margin-top: 8px; }
.clora-adv label { display: block; font-size: 9pt; color: var(--small-label-color, #aaa); margin-bottom: 2px; }
.clora-adv input.clora-dirty, .clora-adv select.clora-dirty { border-color: var(--accent-color); }
.clora-adv .clora-adv-tier[hidden] { display: none; }
.clora-adv input[aria-invalid="true"] { border-color: var(--status-red, red); }
.clora-root details > .clora-err { margin-top: 6px; }
.clora-drop { border: 2px dashed var(--background-color4); border-radius: 7px; padding: 14px; text-align: center; cursor: pointer;
background: var(--background-color3); color: var(--small-label-color, #aaa); transition: border-color 0.15s, background 0.15s; }
.clora-drop:hover, .clora-drop.clora-over { border-color: var(--accent-color); background: var(--background-color1); color: var(--text-color); }
.clora-drop i { font-size: 20px; display: block; margin-bottom: 4px; }
.clora-thumbs { display: grid; grid-template-columns: repeat(auto-fill, minmax(72px, 1fr)); gap: 6px; margin-top: 8px; }
.clora-thumb { position: relative; aspect-ratio: 1; border-radius: 5px; overflow: hidden; background: var(--background-color4); border: 2px solid transparent; }
.clora-thumb.clora-bad { border-color: var(--status-red, red); }
.clora-thumb img { width: 100%; height: 100%; object-fit: cover; display: block; }
.clora-thumb button { position: absolute; top: 2px; right: 2px; width: 20px; height: 20px; padding: 0; border-radius: 50%; font-size: 10px; line-height: 20px; opacity: 0.85; }
.clora-count { display: flex; justify-content: space-between; margin-top: 6px; font-size: 10pt; }
.clora-count b[data-ok="true"] { color: #5fbf5f; }
.clora-count b[data-ok="false"] { color: var(--status-orange, orange); }
.clora-start { display: flex; align-items: center; gap: 10px; margin-top: 12px; flex-wrap: wrap; }
.clora-start .primaryButton { font-size: 11pt; padding: 6px 14px; border-radius: var(--input-border-radius, 4px); }
.clora-start .primaryButton:disabled { opacity: 0.45; cursor: not-allowed; }
.clora-start .clora-reason { font-size: 9pt; color: var(--small-label-color, #999); }
.clora-badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 9pt; background: var(--background-color4); white-space: nowrap; }
.clora-badge[data-state="prepping"], .clora-badge[data-state="training"], .clora-badge[data-state="copying"] { background: var(--accent-color); color: var(--accent-text-color); }
.clora-badge[data-state="done"] { background: #2e7d32; color: #fff; }
.clora-badge[data-state="error"] { background: #b3261e; color: #fff; }
.clora-badge[data-state="cancelled"], .clora-badge[data-state="interrupted"] { background: var(--status-orange, orange); color: #000; }
.clora-job-title { display: flex; justify-content: space-between; align-items: center; gap: 8px; margin-bottom: 8px; }
.clora-job-title b { font-size: 12pt; }
.clora-job-settings { margin: -4px 0 8px 0; font-size: 9pt; color: var(--small-label-color, #999); }
.clora-recovery { margin: -2px 0 8px 0; }
.clora-recovery[hidden] { display: none; }
.clora-retry { padding: 6px 8px; margin-bottom: 4px; border-radius: 5px; border-left: 3px solid var(--status-orange, orange); background: var(--background-color3); }
.clora-retry i { color: var(--status-orange, orange); }
.clora-notices { margin: 0 0 2px 0; padding-left: 18px; font-size: 9pt; color: var(--small-label-color, #999); }
.clora-recovery .clora-small { font-size: 9pt; color: var(--small-label-color, #999); }
.clora-bar { height: 14px; border-radius: 7px; background: var(--background-color4); overflow: hidden; }
.clora-bar > div { height: 100%; width: 0; background: var(--accent-color); transition: width 0.4s; }
.clora-bar[data-state="done"] > div { background: #2e7d32; }
.clora-stats { display: grid; grid-template-columns: repeat(auto-fill, minmax(95px, 1fr)); gap: 6px; margin: 8px 0; }
.clora-stats div { background: var(--background-color3); border-radius: 5px; padding: 4px 6px; }
.clora-stats b[data-phase="preview"] { color: var(--status-orange, orange); font-weight: normal; font-size: 9pt; }
.clora-stats span { display: block; font-size: 8pt; color: var(--small-label-color, #999); }
.clora-log { background: var(--background-color4); border-radius: 5px; padding: 6px 8px; height: 170px; overflow: auto; font-family: monospace; font-size: 8.5pt;
white-space: pre-wrap; word-break: break-all; margin: 0; color: var(--text-color); }
.clora-samples { margin: 0 0 8px 0; }
.clora-samples-head { font-size: 9pt; color: var(--small-label-color, #999); margin-bottom: 4px; }
.clora-sample-strip { display: flex; gap: 6px; align-items: flex-end; overflow-x: auto; padding-bottom: 4px; }
.clora-root .clora-sample { flex: 0 0 auto; display: flex; flex-direction: column; align-items: center; gap: 2px; padding: 0; margin: 0;
background: none; border: none; color: var(--small-label-color, #999); font-size: 8pt; cursor: pointer; }
.clora-root .clora-sample:hover { background: none; color: var(--text-color); }
.clora-sample-pic { position: relative; display: block; width: 64px; height: 64px; border-radius: 5px; overflow: hidden;
background: var(--background-color4); border: 2px solid var(--background-color3); }
.clora-sample.clora-latest .clora-sample-pic { width: 112px; height: 112px; border-color: var(--accent-color); }
.clora-sample-label { max-width: 68px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.clora-sample.clora-latest .clora-sample-label { max-width: 116px; color: var(--text-color); font-weight: bold; }
.clora-sample:hover .clora-sample-pic, .clora-sample:focus-visible .clora-sample-pic { border-color: var(--accent-color-hover, var(--accent-color)); }
.clora-sample img { display: none; width: 100%; height: 100%; object-fit: cover; }
.clora-sample[data-status="ok"] img { display: block; }
.clora-sample:not([data-status="ok"]) .clora-sample-pic::after { content: "…"; position: absolute; inset: 0; display: flex; align-items: center; justify-content: center; }
.clora-sample[data-status="error"] .clora-sample-pic::after { content: "!"; color: var(--status-red, red); font-weight: bold; }
.clora-viewer { position: fixed; inset: 0; z-index: 10000; display: flex; flex-direction: column; align-items: center; justify-content: center; gap: 8px;
background: rgba(0, 0, 0, 0.85); cursor: zoom-out; outline: none; }
.clora-viewer img { width: min(90vw, 80vh); height: auto; max-height: 80vh; object-fit: contain; border-radius: 7px; background: var(--background-color4);
box-shadow: 0 4px 8px 0 rgba(0, 0, 0, 0.15), 0 6px 20px 0 rgba(0, 0, 0, 0.15); }
.clora-viewer-caption { color: var(--text-color); font-size: 10pt; text-align: center; }
.clora-viewer-caption span { color: var(--small-label-color, #999); }
.clora-viewer-hint { display: block; font-size: 9pt; margin-top: 2px; }
.clora-actions { display: flex; gap: 8px; margin-top: 8px; flex-wrap: wrap; align-items: center; }
.clora-result { margin-top: 8px; padding: 8px; border-radius: 5px; background: var(--background-color3); }
.clora-result.clora-error { border-left: 3px solid var(--status-red, red); }
.clora-result.clora-ok { border-left: 3px solid #2e7d32; }
.clora-result code { word-break: break-all; }
.clora-empty { color: var(--small-label-color, #999); font-size: 10pt; }
.clora-jobs { width: 100%; border-collapse: collapse; font-size: 10pt; }
.clora-jobs th { text-align: left; font-weight: normal; color: var(--small-label-color, #999); font-size: 9pt; padding: 2px 4px; }
.clora-jobs td { padding: 4px; border-top: 1px solid var(--background-color3); vertical-align: middle; }
.clora-jobs tr.clora-row { cursor: pointer; }
.clora-jobs tr.clora-row:hover td { background: var(--background-color3); }
.clora-jobs tr.clora-selected td { background: var(--background-color1); }
.clora-jobs .clora-small { font-size: 9pt; color: var(--small-label-color, #999); }
.clora-jobs button { padding: 1px 6px; }
/* issue 10 B1: automatic tags (views/tagger.js) */
.clora-tagger { margin: 8px 0; padding: 8px; border-radius: 5px; background: var(--background-color3); }
.clora-tagger-head { display: flex; align-items: center; gap: 8px; flex-wrap: wrap; }
.clora-tagger-head button { flex: none; }
.clora-tagger-head input[type="number"] { width: 64px; padding: 2px 4px; color: var(--input-text-color); background: var(--input-background-color);
border: var(--input-border-size, 1px) solid var(--input-border-color); border-radius: var(--input-border-radius, 4px); }
.clora-tagger .clora-reason { font-size: 9pt; color: var(--small-label-color, #999); }
.clora-tagger-progress { display: flex; align-items: center; gap: 8px; margin-top: 6px; flex-wrap: wrap; font-size: 10pt; }
.clora-tagger-progress progress { width: 140px; }
.clora-tags { display: flex; flex-wrap: wrap; gap: 4px 6px; margin-top: 6px; }
.clora-tag { display: inline-flex; align-items: center; gap: 4px; padding: 2px 6px; border-radius: 4px; background: var(--background-color1); font-size: 10pt; cursor: pointer; }
.clora-tag.clora-tag-suggested { border: 1px dashed var(--status-orange, orange); }
.clora-tag-count { color: var(--small-label-color, #999); font-size: 9pt; }
.clora-tagger-captions { margin-top: 6px; font-size: 9pt; }
.clora-tagger-captions ol { margin: 4px 0 0 0; padding-left: 20px; }
.clora-tagger-captions .clora-small { color: var(--small-label-color, #999); }
/* issue 10 C1: warnings about the pictures (badges on the cards, the set's warnings above them) */
/* in the card's text column, above the caption (the picture itself stays clear) */
.clora-thumb .clora-warns { display: flex; flex-wrap: wrap; gap: 2px; pointer-events: none; }
.clora-thumb .clora-warn { position: static; width: auto; height: auto; padding: 0 4px; border-radius: 3px; border: none; font-size: 8pt; line-height: 15px; opacity: 0.92;
background: var(--status-orange, #d97706); color: #000; cursor: help; pointer-events: auto; white-space: nowrap; max-width: 100%; overflow: hidden; text-overflow: ellipsis; }
.clora-thumb .clora-warn[data-code="unreadable"] { background: var(--status-red, red); color: #fff; }
.clora-thumb .clora-warn:hover, .clora-thumb .clora-warn:focus-visible { opacity: 1; outline: 1px solid var(--text-color); }
.clora-picture-set { margin-top: 8px; display: flex; flex-direction: column; gap: 4px; }
.clora-set-warn { padding: 4px 8px; border-radius: 5px; border-left: 3px solid var(--status-orange, #d97706); background: var(--background-color3); font-size: 10pt; }
.clora-set-warn .clora-set-hint { color: var(--small-label-color, #999); }
/* issue 10 B2: picture cards with their captions. A card is a small square picture beside its caption (the fixed
   "<trigger> <class>," chip, locked, then the user's text); 25 cards scroll inside the form instead of stretching it. */
.clora-thumbs { grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); max-height: min(62vh, 560px); overflow-y: auto; padding-right: 2px; }
.clora-thumb { aspect-ratio: auto; overflow: visible; display: grid; grid-template-columns: 64px minmax(0, 1fr); column-gap: 6px;
align-items: start; align-content: start; padding: 3px; background: var(--background-color3); }
.clora-thumb > .clora-thumb-pic { grid-column: 1; grid-row: 1 / span 6; position: relative; width: 64px; height: 64px; border-radius: 4px;
overflow: hidden; background: var(--background-color4); }
.clora-thumb > :not(.clora-thumb-pic):not(button) { grid-column: 2; min-width: 0; }
.clora-root .clora-thumb > button { top: 5px; right: auto; left: 47px; }
.clora-cap { display: flex; flex-direction: column; gap: 2px; min-width: 0; }
.clora-cap-prefix { display: inline-flex; align-items: center; gap: 4px; align-self: flex-start; max-width: 100%; padding: 0 6px; border-radius: 8px;
font-size: 8.5pt; line-height: 16px; background: var(--background-color4); color: var(--small-label-color, #999); cursor: default; user-select: none; }
.clora-cap-prefix i { font-size: 7pt; }
.clora-cap-prefix span { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.clora-root .clora-cap-input { width: 100%; box-sizing: border-box; min-height: 34px; resize: vertical; padding: 2px 4px; font-size: 9pt; line-height: 1.25;
font-family: inherit; color: var(--input-text-color); background: var(--input-background-color);
border: var(--input-border-size, 1px) solid var(--input-border-color); border-radius: var(--input-border-radius, 4px); }
.clora-cap-note { font-size: 8pt; color: var(--status-orange, orange); }
.clora-cap-note:empty { display: none; }
/* issue 10 A: the loss chart and the saved epochs */
.clora-loss { margin-top: 8px; }
.clora-loss-head { font-size: 10pt; margin-bottom: 4px; color: var(--text-color); }
.clora-loss canvas { display: block; width: 100%; border-radius: 5px; background: var(--background-color1, transparent); }
.clora-epochs { margin-top: 8px; }
.clora-epoch-list { display: flex; flex-direction: column; gap: 6px; }
.clora-epoch { padding: 6px 8px; border-radius: 5px; background: var(--background-color3); }
.clora-epoch-final { border-left: 3px solid var(--accent-color, #6f6cd9); }
.clora-epoch-head { display: flex; gap: 10px; align-items: baseline; flex-wrap: wrap; }
.clora-epoch-head .clora-small { color: var(--small-label-color, #999); }
.clora-epoch-pics { display: flex; gap: 6px; margin-top: 4px; overflow-x: auto; }
.clora-epoch-pics .clora-sample { flex: none; }
.clora-epoch-nopic { margin-top: 4px; color: var(--small-label-color, #999); }
.clora-epoch .clora-actions { margin-top: 4px; }
.clora-epoch code { word-break: break-all; }
.clora-epoch .tertiaryButton:disabled { opacity: 0.5; cursor: default; }
/* issue 10 C2: the face crop — the checkbox, the crop frame over a thumbnail (outside it dimmed), "no face" */
.clora-face-crop { margin: 8px 0 4px; }
.clora-face-crop .clora-check { display: inline-flex; align-items: center; gap: 6px; cursor: pointer; }
.clora-face-crop .clora-help { margin-top: 2px; }
.clora-face-crop input:disabled { cursor: not-allowed; }
.clora-thumb-pic { position: relative; aspect-ratio: 1; overflow: hidden; }
.clora-crop-frame { position: absolute; box-sizing: border-box; border: 2px solid var(--accent-color, #e5b94d); box-shadow: 0 0 0 999px rgba(0, 0, 0, 0.55); pointer-events: none; }
.clora-crop-none { position: absolute; left: 0; right: 0; bottom: 0; padding: 1px 3px; font-size: 8pt; text-align: center; background: rgba(0, 0, 0, 0.6); color: #fff; pointer-events: none; }
`
