// The reviewers' UI: toasts, keyboard shortcuts and the review screen. No build step, no dependencies.
(function () {
  "use strict";

  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  function toast(message, kind) {
    const box = document.getElementById("toasts");
    if (!box || !message) return;
    const el = document.createElement("div");
    el.className = "toast" + (kind ? " toast-" + kind : "");
    el.setAttribute("role", "status");
    el.textContent = message;
    box.appendChild(el);
    setTimeout(() => el.classList.add("leaving"), kind === "error" ? 4200 : 2200);
    setTimeout(() => el.remove(), kind === "error" ? 4500 : 2500);
  }

  async function post(url, body) {
    const response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: {
        "Content-Type": "application/json",
        "X-CSRF-Token": csrf(),
        "X-Requested-With": "fetch",
      },
      body: JSON.stringify(body || {}),
    });
    let data = {};
    try {
      data = await response.json();
    } catch (e) {
      data = {};
    }
    if (response.status === 401) {
      window.location.href = "/review/login?next=" + encodeURIComponent(location.pathname + location.search);
      throw new Error("signed out");
    }
    if (!response.ok) {
      const error = new Error((data.error && data.error.message) || "Request failed (" + response.status + ")");
      error.status = response.status;
      error.code = data.error && data.error.code;
      throw error;
    }
    return data;
  }

  const typing = (target) =>
    target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT" || target.isContentEditable);

  // ---------------------------------------------------------------- review screen
  function ReviewScreen(stage) {
    this.stage = stage;
    this.queue = stage.dataset.queue || "review";
    this.busy = false;
    this.renewTimer = null;
    this.pollTimer = null;
  }

  ReviewScreen.prototype.item = function () {
    return this.stage.querySelector("#item");
  };

  ReviewScreen.prototype.show = function (html) {
    this.stage.innerHTML = html;
    window.scrollTo(0, 0);
    this.bind();
  };

  ReviewScreen.prototype.bind = function () {
    clearInterval(this.renewTimer);
    clearTimeout(this.pollTimer);
    const item = this.item();
    if (item) {
      const self = this;
      this.renewTimer = setInterval(() => self.renew(), 120000);
      const img = item.querySelector("#media-img");
      if (img && !img.complete) img.decoding = "async";
    } else if (this.stage.querySelector("#empty")) {
      this.pollTimer = setTimeout(() => this.next(true), 8000);
    }
  };

  ReviewScreen.prototype.setBusy = function (busy) {
    this.busy = busy;
    document.body.classList.toggle("busy", busy);
  };

  ReviewScreen.prototype.next = async function (quiet) {
    try {
      const data = await post("/review/work/next", { queue: this.queue });
      if (quiet && !data.item_id) {
        this.bind();
        return;
      }
      this.show(data.html);
    } catch (e) {
      if (!quiet) toast(e.message, "error");
      this.pollTimer = setTimeout(() => this.next(true), 8000);
    }
  };

  ReviewScreen.prototype.renew = function () {
    const item = this.item();
    if (!item || !item.dataset.leaseToken) return;
    post("/review/work/" + item.dataset.itemId + "/renew", { lease_token: item.dataset.leaseToken }).catch((e) => {
      if (e.status === 409) toast("Your hold on this item ended; it may have been reassigned.", "error");
    });
  };

  ReviewScreen.prototype.act = async function (path, body, kind) {
    const item = this.item();
    if (!item || this.busy) return;
    this.setBusy(true);
    try {
      const data = await post("/review/work/" + item.dataset.itemId + "/" + path, {
        lease_token: item.dataset.leaseToken,
        queue: this.queue,
        ...body,
      });
      if (data.redirect) {
        window.location.href = data.redirect + "?toast=" + encodeURIComponent(data.toast || "");
        return;
      }
      toast(data.toast, kind);
      this.show(data.html);
    } catch (e) {
      toast(e.message, "error");
      if (e.status === 409) await this.next();
    } finally {
      this.setBusy(false);
    }
  };

  ReviewScreen.prototype.note = function () {
    const input = this.stage.querySelector("#note");
    return input && input.value.trim() ? input.value.trim() : null;
  };

  ReviewScreen.prototype.picker = function () {
    return this.stage.querySelector("#reject-picker");
  };

  ReviewScreen.prototype.decide = function (decision, categories) {
    return this.act("decide", { decision: decision, categories: categories || [], note: this.note() }, decision);
  };

  ReviewScreen.prototype.reject = function () {
    const picker = this.picker();
    if (!picker) return;
    if (picker.hidden) {
      picker.hidden = false;
      return;
    }
    const chosen = Array.from(picker.querySelectorAll(".chip.is-on")).map((c) => c.dataset.category);
    if (!chosen.length) {
      toast("Pick at least one category (1–9)", "error");
      return;
    }
    this.decide("reject", chosen);
  };

  ReviewScreen.prototype.toggleChip = function (chip) {
    const on = !chip.classList.contains("is-on");
    chip.classList.toggle("is-on", on);
    chip.setAttribute("aria-pressed", on ? "true" : "false");
  };

  ReviewScreen.prototype.unblur = function () {
    const frame = this.stage.querySelector("#media");
    if (frame && this.item().dataset.sensitive === "1") frame.classList.toggle("is-blurred");
  };

  ReviewScreen.prototype.help = function (show) {
    const help = document.getElementById("help");
    if (help) help.hidden = show === undefined ? !help.hidden : !show;
  };

  ReviewScreen.prototype.run = function (action) {
    switch (action) {
      case "approve":
        return this.decide("approve");
      case "reject":
        return this.reject();
      case "escalate":
        return this.decide("escalate", []);
      case "skip":
        return this.act("skip", {}, "skip");
      case "release":
        return this.act("release", {});
      case "unblur":
        return this.unblur();
      case "help":
        return this.help();
    }
  };

  ReviewScreen.prototype.onKey = function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key;
    const help = document.getElementById("help");
    if (key === "Escape") {
      if (help && !help.hidden) return this.help(false);
      const picker = this.picker();
      if (picker && !picker.hidden) return (picker.hidden = true);
      if (typing(event.target)) return event.target.blur();
      return;
    }
    if (typing(event.target)) {
      if (key === "Enter" && event.target.id === "note") {
        event.preventDefault();
        event.target.blur();
      }
      return;
    }
    if (key === "?") return this.help();
    if (!this.item()) return;
    const picker = this.picker();
    if (picker && !picker.hidden) {
      if (/^[1-9]$/.test(key)) {
        const chip = picker.querySelectorAll(".chip")[Number(key) - 1];
        if (chip) this.toggleChip(chip);
        event.preventDefault();
        return;
      }
      if (key === "Enter" || key === "r" || key === "R") {
        event.preventDefault();
        return this.reject();
      }
    }
    const actions = { a: "approve", r: "reject", e: "escalate", s: "skip", u: "unblur" };
    const action = actions[key.toLowerCase()];
    if (action) {
      event.preventDefault();
      return this.run(action);
    }
    if (key === "n" || key === "N") {
      const note = this.stage.querySelector("#note");
      if (note) {
        event.preventDefault();
        note.focus();
      }
    }
  };

  ReviewScreen.prototype.start = function () {
    const self = this;
    document.addEventListener("keydown", (e) => self.onKey(e));
    this.stage.addEventListener("click", (e) => {
      const chip = e.target.closest(".chip");
      if (chip) return self.toggleChip(chip);
      const button = e.target.closest("[data-action]");
      if (button) {
        e.preventDefault();
        self.run(button.dataset.action);
      }
    });
    const help = document.getElementById("help");
    if (help) help.addEventListener("click", (e) => e.target === help && self.help(false));
    if (this.item()) this.bind();
    else this.next();
  };

  // ---------------------------------------------------------------- other pages
  function initPage() {
    const box = document.getElementById("toasts");
    if (box && box.dataset.initial) toast(box.dataset.initial);
    const stage = document.getElementById("stage");
    if (stage) {
      new ReviewScreen(stage).start();
      return;
    }
    // The read-only item page can still unblur.
    const media = document.getElementById("media");
    if (media) {
      const toggle = () => media.classList.toggle("is-blurred");
      const reveal = document.getElementById("reveal");
      if (reveal) reveal.addEventListener("click", toggle);
      document.addEventListener("keydown", (e) => {
        if (!typing(e.target) && (e.key === "u" || e.key === "U") && !e.ctrlKey && !e.metaKey) toggle();
      });
    }
    const start = document.getElementById("start-reviewing");
    if (start) {
      document.addEventListener("keydown", (e) => {
        if (e.key === "Enter" && !typing(e.target)) window.location.href = start.href;
      });
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", initPage);
  else initPage();
})();
