// Sign in (username and password, or an API key), register where registration is open, and
// sign out. The token lives in sessionStorage, for this tab only.

import { api, el, clear, setToken, whoAmI } from "./api.js";

/// The account bar in the header: who is signed in, and a sign-out button.
export function renderAccount(bar, account, info, onChange) {
  clear(bar);
  if (!info.enabled) {
    bar.append(el("span", { class: "muted", text: "accounts off: anonymous access" }));
    return;
  }
  if (!account) return;
  bar.append(
    el("span", { class: "who", id: "who" }, [el("span", { text: account.username }), account.role === "admin" ? el("span", { class: "badge", text: "admin" }) : null]),
    el("button", {
      type: "button",
      class: "link",
      id: "sign-out",
      text: "Sign out",
      onclick: () => {
        setToken(null);
        onChange();
      },
    }),
  );
}

/// The sign-in form. Calls `onSignedIn(account)` once a token works.
export function renderSignIn(container, info, onSignedIn, note) {
  clear(container);
  const message = el("p", { class: "error", role: "alert", id: "signin-error" });
  const username = el("input", { name: "username", id: "username", autocomplete: "username", required: true, minLength: 3 });
  const password = el("input", { name: "password", id: "password", type: "password", autocomplete: "current-password", required: true, minLength: 8 });
  const key = el("input", { name: "key", id: "api-key", type: "password", autocomplete: "off", placeholder: "chm_…" });

  const finish = async () => {
    const account = await whoAmI();
    if (!account) {
      message.textContent = "this token is not accepted";
      setToken(null);
      return;
    }
    onSignedIn(account);
  };
  const logIn = async () => {
    const answer = await api("/api/v1/auth/login", { method: "POST", body: { username: username.value, password: password.value } });
    setToken(answer.access_token);
    await finish();
  };
  const guard = (action) => async (event) => {
    event.preventDefault();
    message.textContent = "";
    try {
      await action();
    } catch (error) {
      message.textContent = error.message;
    }
  };

  const form = el("form", { class: "signin", id: "signin", onsubmit: guard(logIn) }, [
    el("h2", { text: "Sign in" }),
    note ? el("p", { class: "muted", text: note }) : null,
    el("label", {}, ["Username", username]),
    el("label", {}, ["Password", password]),
    el("div", { class: "row" }, [
      el("button", { type: "submit", id: "sign-in", text: "Sign in" }),
      info.open_registration
        ? el("button", {
            type: "button",
            id: "register",
            class: "secondary",
            text: "Register",
            onclick: guard(async () => {
              if (!form.reportValidity()) return;
              await api("/api/v1/auth/register", { method: "POST", body: { username: username.value, password: password.value } });
              await logIn();
            }),
          })
        : null,
    ]),
    message,
  ]);
  const keyForm = el("form", { class: "signin key", id: "key-signin", onsubmit: guard(async () => {
    setToken(key.value.trim());
    await finish();
  }) }, [
    el("details", {}, [
      el("summary", { text: "Use an API key instead" }),
      el("label", {}, ["API key", key]),
      el("button", { type: "submit", id: "use-key", text: "Use this key" }),
    ]),
  ]);
  container.append(form, keyForm);
  username.focus();
}
