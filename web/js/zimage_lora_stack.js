// Z-Image Turbo LoRA Stack: one row per LoRA (on/off, file, strength, move up/down, remove) and an
// "Add LoRA" button, instead of typing JSON.
//
// The node's real input is the STRING widget `loras` holding
//   [{"lora": "file.safetensors", "strength": 0.8, "on": true}, ...]
// That widget stays the single source of truth: it is hidden but still saved in widgets_values
// and sent by graphToPrompt, so a saved workflow, the queued prompt and an API user's JSON are
// the same text. The rows are only a view of it: every edit rewrites the JSON, and whenever the
// JSON is set from outside (loading a workflow, paste, undo) the rows are rebuilt from it.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { addStyle, el, hideWidget, passCanvasGestures } from "./zimage_dom.js";

const NODE_CLASS = "ZImageTurboLoraStack";
const STRENGTH_STEP = 0.05;
// Heights in px; they must match the CSS below, the node's minimum size is computed from them.
const ROW_HEIGHT = 30;
const FOOTER_HEIGHT = 34;
const STATUS_HEIGHT = 36;
const PADDING = 8;

addStyle("zimage-lora-stack-style", `
.zimage-lora-stack { display: flex; flex-direction: column; gap: 4px; box-sizing: border-box; padding: 2px 0;
  font: 12px sans-serif; color: var(--input-text, #ddd); overflow: hidden; }
.zimage-lora-row { display: flex; align-items: center; gap: 4px; height: 26px; flex: none; }
.zimage-lora-row.zimage-lora-off > :not(.zimage-lora-on) { opacity: 0.45; }
.zimage-lora-row select, .zimage-lora-row input[type=number] { height: 24px; box-sizing: border-box;
  background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd);
  border: 1px solid var(--border-color, #444); border-radius: 4px; font: inherit; }
.zimage-lora-name { flex: 1 1 auto; min-width: 60px; }
.zimage-lora-row.zimage-lora-missing .zimage-lora-name { border-color: var(--error-text, #f55); color: var(--error-text, #f55); }
.zimage-lora-strength { width: 64px; flex: none; padding: 0 4px; }
.zimage-lora-on { width: 16px; height: 16px; margin: 0 2px; flex: none; accent-color: #4caf50; cursor: pointer; }
.zimage-lora-stack button { height: 24px; min-width: 24px; padding: 0 6px; flex: none; cursor: pointer;
  background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd);
  border: 1px solid var(--border-color, #444); border-radius: 4px; font: inherit; }
.zimage-lora-stack button:disabled { opacity: 0.35; cursor: default; }
.zimage-lora-stack button:not(:disabled):hover { border-color: var(--fg-color, #fff); }
.zimage-lora-footer { display: flex; align-items: center; gap: 6px; height: 30px; flex: none; }
.zimage-lora-count { color: var(--descrip-text, #999); }
.zimage-lora-status { flex: none; min-height: 32px; max-height: 32px; overflow: auto; line-height: 16px;
  color: var(--error-text, #f66); white-space: normal; }
.zimage-lora-status:empty { display: none; }
`);

// ---------------------------------------------------------------- the `loras` JSON

/** Rows from the widget's JSON text, with the same defaults the backend applies (strength 1, on). */
function parseRows(text) {
    let data;
    try {
        data = JSON.parse(text?.trim() ? text : "[]");
    } catch (err) {
        return { rows: [], error: `The loras value is not valid JSON (${err.message}).` };
    }
    if (!Array.isArray(data)) return { rows: [], error: "The loras value is not a JSON list." };
    const rows = [];
    for (const [i, item] of data.entries()) {
        if (!item || typeof item !== "object" || typeof item.lora !== "string") {
            return { rows, error: `Row ${i + 1} of the loras value has no "lora" file name.` };
        }
        const strength = item.strength === undefined ? 1 : item.strength;
        if (typeof strength !== "number") {
            return { rows, error: `Row ${i + 1} (${item.lora}): strength is not a number.` };
        }
        const on = item.on === undefined ? true : item.on;
        if (typeof on !== "boolean") {
            // The backend refuses it too: a string "false" must never switch a LoRA on.
            return { rows, error: `Row ${i + 1} (${item.lora}): "on" must be true or false.` };
        }
        rows.push({ lora: item.lora, strength, on });
    }
    return { rows, error: null };
}

/** The JSON the backend (and an API user) reads: only the three documented keys, in a fixed order. */
function serializeRows(rows) {
    return JSON.stringify(rows.map(({ lora, strength, on }) => ({ lora, strength, on })));
}

// ---------------------------------------------------------------- the models/loras file list

// One list for every stack node; fetched on first use and again on ComfyUI's "Refresh".
const loraFiles = {
    names: null, // string[] once loaded
    error: null, // text of the last failure
    request: null, // the fetch in flight
    editors: new Set(), // editors to re-render when the list changes
};

function loadLoraFiles(force = false) {
    if (loraFiles.request) return loraFiles.request;
    if (loraFiles.names && !force) return Promise.resolve();
    loraFiles.request = (async () => {
        try {
            // ComfyUI 0.3.75: GET /models/loras -> ["a.safetensors", "sub/b.safetensors", ...]
            const res = await api.fetchApi("/models/loras", { cache: "no-store" });
            if (!res.ok) throw new Error(`the server answered ${res.status} ${res.statusText}`.trim());
            const names = await res.json();
            if (!Array.isArray(names)) throw new Error("the answer is not a list");
            loraFiles.names = names.filter((n) => typeof n === "string");
            loraFiles.error = null;
        } catch (err) {
            loraFiles.error = `Could not load the LoRA list from models/loras: ${err.message ?? err}`;
            console.error("[Z-Image Turbo]", loraFiles.error);
        } finally {
            loraFiles.request = null;
            for (const editor of loraFiles.editors) editor.render();
        }
    })();
    return loraFiles.request;
}

// ---------------------------------------------------------------- the rows editor

class LoraRowsEditor {
    constructor(node, lorasWidget) {
        this.node = node;
        this.lorasWidget = lorasWidget;
        this.rows = [];
        this.parseError = null;
        this.writing = false; // true while we write the JSON ourselves (no re-render then)
        this.element = el("div.zimage-lora-stack", { dataset: { zimageLoraStack: "" } });
        this.readFromWidget();
    }

    /** Rebuild the rows from the JSON (after a load, paste, undo...). */
    readFromWidget() {
        const { rows, error } = parseRows(this.lorasWidget.value);
        this.rows = rows;
        this.parseError = error;
        this.render();
    }

    /**
     * Write the rows back into the JSON widget. `rerender`: rebuild the controls (not while the
     * user types a strength, which would take the focus away); `snug`: rows were added/removed.
     */
    commit(rerender, snug = false) {
        this.parseError = null;
        this.writing = true;
        try {
            this.lorasWidget.value = serializeRows(this.rows);
        } finally {
            this.writing = false;
        }
        if (rerender) this.render(snug);
        this.node.setDirtyCanvas(true, true);
    }

    isInputLinked() {
        const slot = this.node.inputs?.find((input) => input.name === this.lorasWidget.name);
        return slot?.link != null;
    }

    /** Height the widget needs for the current rows; the node never gets smaller than this. */
    minHeight() {
        const status = this.statusText() ? STATUS_HEIGHT : 0;
        return PADDING + this.rows.length * ROW_HEIGHT + FOOTER_HEIGHT + status + 2 * (this.widget?.margin ?? 6);
    }

    statusText() {
        if (this.isInputLinked()) return "The loras input is linked: the rows come from that link.";
        if (this.parseError) return `${this.parseError} Editing the rows replaces it.`;
        if (loraFiles.error) return loraFiles.error;
        if (loraFiles.names && loraFiles.names.length === 0) {
            return "No LoRA files found: put .safetensors LoRAs in ComfyUI/models/loras and press Refresh (R).";
        }
        const missing = this.rows.filter((r) => r.on && r.lora && loraFiles.names && !loraFiles.names.includes(r.lora));
        if (missing.length) return `Not in models/loras: ${missing.map((r) => r.lora).join(", ")}`;
        return "";
    }

    /**
     * Make the node tall enough for the rows. After adding or removing a row (`snug`) it also
     * shrinks back; otherwise a node the user made taller keeps its size.
     */
    fitNode(snug) {
        if (!this.widget) return; // still being built: ComfyUI sizes the new node itself
        const wanted = this.node.computeSize();
        const height = snug ? wanted[1] : Math.max(this.node.size[1], wanted[1]);
        if (Math.abs(this.node.size[1] - height) > 1) {
            this.node.setSize([Math.max(this.node.size[0], wanted[0]), height]);
        }
    }

    render(snug = false) {
        const disabled = this.isInputLinked();
        const rowElements = this.rows.map((row, index) => this.renderRow(row, index, disabled));
        const active = this.rows.filter((r) => r.on).length;
        const footer = el("div.zimage-lora-footer", {},
            el("button.zimage-lora-add", {
                type: "button", disabled, title: "Add a row for another LoRA from models/loras",
                onclick: () => this.addRow(),
            }, "+ Add LoRA"),
            el("span.zimage-lora-count", {}, `${active} of ${this.rows.length} on`),
        );
        const status = el("div.zimage-lora-status", { role: "status" }, this.statusText());
        this.element.replaceChildren(...rowElements, footer, status);
        this.fitNode(snug);
    }

    renderRow(row, index, disabled) {
        const known = loraFiles.names;
        const missing = Boolean(row.lora) && known !== null && !known.includes(row.lora);
        const choices = known ? [...known] : [];
        if (row.lora && !choices.includes(row.lora)) choices.unshift(row.lora); // keep what the workflow says
        const select = el("select.zimage-lora-name", {
            disabled, title: missing ? `${row.lora} is not in models/loras` : row.lora,
            onchange: () => { row.lora = select.value; this.commit(true); },
        },
            row.lora ? null : el("option", { value: "", selected: true }, "(choose a LoRA)"),
            choices.map((name) => el("option", { value: name, selected: name === row.lora },
                name === row.lora && missing ? `${name} (missing)` : name)),
        );
        const strength = el("input.zimage-lora-strength", {
            type: "number", step: String(STRENGTH_STEP), value: String(row.strength), disabled,
            title: "Strength: negative and above 1 are allowed",
            // Commit on every valid keystroke/arrow click without re-rendering (keeps the focus).
            oninput: () => {
                const value = Number.parseFloat(strength.value);
                if (!Number.isFinite(value)) return;
                row.strength = Math.round(value * 10000) / 10000;
                this.commit(false);
            },
            onchange: () => { strength.value = String(row.strength); },
        });
        const last = this.rows.length - 1;
        const button = (cls, label, title, off, action) =>
            el(`button.${cls}`, { type: "button", title, disabled: disabled || off, onclick: action }, label);
        return el(`div.zimage-lora-row${row.on ? "" : ".zimage-lora-off"}${missing ? ".zimage-lora-missing" : ""}`,
            { dataset: { index: String(index) } },
            el("input.zimage-lora-on", {
                type: "checkbox", checked: row.on, disabled, title: row.on ? "On: click to switch off" : "Off: click to switch on",
                onchange: (e) => { row.on = e.target.checked; this.commit(true); },
            }),
            select,
            strength,
            button("zimage-lora-up", "▲", "Move up", index === 0, () => this.move(index, -1)),
            button("zimage-lora-down", "▼", "Move down", index === last, () => this.move(index, 1)),
            button("zimage-lora-remove", "✕", "Remove this row", false, () => this.remove(index)),
        );
    }

    addRow() {
        const names = loraFiles.names ?? [];
        const used = new Set(this.rows.map((r) => r.lora));
        const lora = names.find((n) => !used.has(n)) ?? names[0] ?? "";
        this.rows.push({ lora, strength: 1, on: true });
        this.commit(true, true);
    }

    move(index, delta) {
        const target = index + delta;
        if (target < 0 || target >= this.rows.length) return;
        [this.rows[index], this.rows[target]] = [this.rows[target], this.rows[index]];
        this.commit(true);
    }

    remove(index) {
        this.rows.splice(index, 1);
        this.commit(true, true);
    }
}

// ---------------------------------------------------------------- wiring into the node

function attachEditor(node) {
    const lorasWidget = node.widgets?.find((w) => w.name === "loras");
    if (!lorasWidget) {
        console.warn("[Z-Image Turbo] LoRA Stack node without a loras widget; rows editor not added");
        return;
    }
    hideWidget(lorasWidget);

    const editor = new LoraRowsEditor(node, lorasWidget);
    const widget = node.addDOMWidget("lora_rows", "zimage_lora_rows", editor.element, {
        serialize: false, // the rows live in `loras`; this widget adds nothing to the workflow or prompt
        hideOnZoom: true,
        margin: 6,
        getValue: () => lorasWidget.value,
        setValue: () => {},
        getMinHeight: () => editor.minHeight(),
    });
    widget.serialize = false; // LGraphNode.serialize checks the widget, graphToPrompt the options
    editor.widget = widget;
    node.zimageLoraEditor = editor; // handle for tests and other extensions
    passCanvasGestures(editor.element, app.canvas);
    // ComfyUI ignores plain keys typed into inputs, but not into a <select>: typing a file name's
    // first letters in the chooser must not fire shortcuts such as R (refresh).
    editor.element.addEventListener("keydown", (e) => {
        if (e.target instanceof HTMLSelectElement && !e.ctrlKey && !e.metaKey && !e.altKey) e.stopPropagation();
    });

    // The JSON changed from outside (configure, paste, undo): rebuild the rows from it.
    const onLorasChanged = lorasWidget.callback;
    lorasWidget.callback = function (...args) {
        const result = onLorasChanged?.apply(this, args);
        if (!editor.writing) editor.readFromWidget();
        return result;
    };

    const onConfigure = node.onConfigure;
    node.onConfigure = function (...args) {
        const result = onConfigure?.apply(this, args);
        editor.readFromWidget();
        return result;
    };

    const onConnectionsChange = node.onConnectionsChange;
    node.onConnectionsChange = function (...args) {
        const result = onConnectionsChange?.apply(this, args);
        editor.render();
        return result;
    };

    const onRemoved = node.onRemoved;
    node.onRemoved = function (...args) {
        loraFiles.editors.delete(editor);
        return onRemoved?.apply(this, args);
    };

    loraFiles.editors.add(editor);
    loadLoraFiles();
}

app.registerExtension({
    name: "ZImageTurbo.LoraStackRows",

    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== NODE_CLASS) return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function (...args) {
            const result = onNodeCreated?.apply(this, args);
            attachEditor(this);
            return result;
        };
    },

    // ComfyUI's Refresh (R) re-reads the model folders: read the LoRA list again too.
    refreshComboInNodes() {
        return loadLoraFiles(true);
    },
});
