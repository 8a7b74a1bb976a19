// What the desk's own routes did not write for the page: the API's JSON refusals (a form over the
// body limit), a server error, no answer at all. For a change (a POST), each is told in the message
// bar and the line is left as it was (htmx would otherwise put a JSON body in the line's place, or
// show nothing for a 5xx); a change that goes through clears what the bar said. The pages' own
// refreshes (GETs every few seconds) only keep a JSON body out of the page: the next one tries again.
(function () {
  "use strict";

  function bar() {
    return document.getElementById("message");
  }

  function show(text) {
    var message = bar();
    if (!message) return;
    var span = document.createElement("span");
    span.className = "error-text";
    span.textContent = text;
    message.replaceChildren(span);
  }

  function said(xhr) {
    try {
      var body = JSON.parse(xhr.responseText);
      if (typeof body.message === "string" && body.message) return body.message;
      if (typeof body.detail === "string") return body.detail;
      if (Array.isArray(body.detail)) {
        return body.detail.map(function (e) { return (e.field ? e.field + ": " : "") + (e.msg || ""); }).join("; ");
      }
    } catch (ignored) { /* not JSON: the desk's own HTML refusal, or the status says it */ }
    if ((xhr.getResponseHeader("content-type") || "").indexOf("text/html") === 0) {
      var own = new DOMParser().parseFromString(xhr.responseText, "text/html").querySelector(".error-text");
      if (own) return own.textContent;
    }
    return "";
  }

  // A change refused for a form token of an earlier session (the writer signed in again in another
  // tab): the answer carries this session's, which the page's forms take, so the change is sent again
  // without a reload and what was typed stays.
  function renew(token) {
    var headers = {};
    try { headers = JSON.parse(document.body.getAttribute("hx-headers") || "{}"); } catch (ignored) { /* none */ }
    headers["X-CSRF-Token"] = token;
    document.body.setAttribute("hx-headers", JSON.stringify(headers));
    document.querySelectorAll("input[name=csrf]").forEach(function (input) { input.value = token; });
  }

  function isChange(detail) {
    var verb = detail.requestConfig && detail.requestConfig.verb;
    return verb !== undefined && verb.toLowerCase() !== "get";
  }

  document.addEventListener("htmx:beforeSwap", function (event) {
    var xhr = event.detail.xhr;
    var change = isChange(event.detail);
    var renewed = xhr.getResponseHeader("X-Desk-Token");
    if (renewed && /^[0-9a-f]{64}$/.test(renewed)) renew(renewed);
    if (xhr.status < 400) {
      if (change && bar()) bar().replaceChildren();
      return;
    }
    var html = (xhr.getResponseHeader("content-type") || "").indexOf("text/html") === 0;
    if (xhr.status < 500 && html) return; // the desk's own refusal: the server aims it at the bar
    event.detail.shouldSwap = false;
    if (!change) return;
    var what = said(xhr).replace(/[.\s]+$/, "");
    if (xhr.status >= 500 && what && html) {
      // The desk's own 503 (another change rewriting the batch's output): its advice, as written.
      show("Not saved (HTTP " + xhr.status + "): " + what + ".");
    } else if (xhr.status >= 500) {
      show("The server could not do this (HTTP " + xhr.status + ")" + (what ? ": " + what : "") +
        ". Reload the page to see what was saved, then try again.");
    } else {
      show("Not saved (HTTP " + xhr.status + "): " + (what || xhr.statusText || "refused") + ".");
    }
  });

  // Focus stays on the control a change was sent from: its buttons are disabled while it is sent,
  // which moves the browser's focus to the page's top, and the line is swapped for a new one. Kept
  // with the request itself: a refresh settling meanwhile, or a change that swaps nothing, moves no
  // focus.
  document.addEventListener("htmx:beforeRequest", function (event) {
    var config = event.detail.requestConfig;
    var active = document.activeElement;
    if (config && isChange(event.detail) && active && active.id) config.mlchatFocus = active.id;
  });
  document.addEventListener("htmx:afterSettle", function (event) {
    var config = event.detail.requestConfig;
    var id = config && config.mlchatFocus;
    if (!id) return;
    config.mlchatFocus = null;
    var again = document.getElementById(id);
    var active = document.activeElement;
    if (!again || again.disabled || (active && active !== document.body)) return;
    // A control inside a closed box (the edit's Save, the box closed as the line is drawn again)
    // cannot take focus: the box's summary does, not the page's top (review).
    var closed = again.closest("details:not([open])");
    (closed ? closed.querySelector("summary") : again).focus();
  });

  // Another change of a line (approve, reject, keep a candidate) while its edit box holds text not
  // saved: the line is redrawn, and what was typed went with it unsaid (review). Not sent: the bar
  // says so and the edit box is opened on the text.
  document.addEventListener("htmx:beforeRequest", function (event) {
    var form = event.detail.elt;
    if (!isChange(event.detail) || !form || !form.closest) return;
    var line = form.closest("section.line");
    var box = line && line.querySelector("textarea[name=reply]");
    if (!box || box.form === form || box.value === box.defaultValue) return;
    event.preventDefault();
    var details = box.closest("details");
    if (details) details.open = true;
    box.focus();
    show("Not sent: this line's edit is not saved. Save the edit, or put the reply back as it was, first.");
  });

  // Leaving the page (a link, a reload, the tab closed) with an edit not saved: the browser asks
  // first, as it does for any form (review: what was typed went unsaid).
  window.addEventListener("beforeunload", function (event) {
    var unsaved = Array.prototype.some.call(
      document.querySelectorAll("textarea[name=reply]"),
      function (box) { return box.value !== box.defaultValue; }
    );
    if (!unsaved) return;
    event.preventDefault();
    event.returnValue = "";
  });

  function noAnswer(event) {
    if (!isChange(event.detail)) return;
    show("No answer came from the server. Reload the page to see what was saved, then try again.");
  }
  document.addEventListener("htmx:sendError", noAnswer);
  document.addEventListener("htmx:timeout", noAnswer);
})();
