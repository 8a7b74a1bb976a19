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
    } catch (ignored) { /* not JSON: the status says it */ }
    return "";
  }

  function isChange(detail) {
    var verb = detail.requestConfig && detail.requestConfig.verb;
    return verb !== undefined && verb.toLowerCase() !== "get";
  }

  document.addEventListener("htmx:beforeSwap", function (event) {
    var xhr = event.detail.xhr;
    var change = isChange(event.detail);
    if (xhr.status < 400) {
      if (change && bar()) bar().replaceChildren();
      return;
    }
    var html = (xhr.getResponseHeader("content-type") || "").indexOf("text/html") === 0;
    if (xhr.status < 500 && html) return; // the desk's own refusal: the server aims it at the bar
    event.detail.shouldSwap = false;
    if (!change) return;
    var what = said(xhr).replace(/[.\s]+$/, "");
    if (xhr.status >= 500) {
      show("The server could not do this (HTTP " + xhr.status + ")" + (what ? ": " + what : "") +
        ". Reload the page to see what was saved, then try again.");
    } else {
      show("Not saved (HTTP " + xhr.status + "): " + (what || xhr.statusText || "refused") + ".");
    }
  });

  function noAnswer(event) {
    if (!isChange(event.detail)) return;
    show("No answer came from the server. Reload the page to see what was saved, then try again.");
  }
  document.addEventListener("htmx:sendError", noAnswer);
  document.addEventListener("htmx:timeout", noAnswer);
})();
