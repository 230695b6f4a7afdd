// The page's sign-in area (protocol.md §2.1): a pasted API key or session token, or Sign-In
// with Ethereum through an EIP-1193 wallet (window.ethereum). The credential is kept in
// sessionStorage (this tab only, gone when it closes), sent as the first message of every
// connection, and never put in a URL. Without one the page chats anonymously, where the
// gateway allows it (a loopback gateway does).

import { signWithWallet } from "./siwe.js";

const STORAGE_KEY = "farmesh.credential";
const $ = (id) => document.getElementById(id);
const ui = {
  form: $("credential-form"), credential: $("credential"), walletButton: $("wallet-signin"),
  signedOut: $("signed-out"), signedIn: $("signed-in"), identity: $("identity"),
  principal: $("principal"), wallet: $("wallet"), signOut: $("sign-out"),
};

let pendingProof = null; // a signed sign-in message for the next connection's first message

function storedCredential() {
  try {
    return sessionStorage.getItem(STORAGE_KEY);
  } catch {
    return null; // storage disabled: the credential lives as long as this page
  }
}

function store(token) {
  try {
    if (token) sessionStorage.setItem(STORAGE_KEY, token);
    else sessionStorage.removeItem(STORAGE_KEY);
  } catch {
    // storage disabled: nothing to keep or forget
  }
}

function showIdentity(stateName, text) {
  ui.identity.dataset.state = stateName;
  ui.identity.textContent = text;
  ui.signedIn.hidden = stateName !== "signed-in";
  ui.signedOut.hidden = stateName === "signed-in";
}

// The first message of a new connection: {"type":"auth",…}, or null to stay anonymous.
export function authMessage() {
  if (pendingProof !== null) {
    const siwe = pendingProof;
    pendingProof = null;
    showIdentity("pending", "signing in…");
    return { type: "auth", siwe };
  }
  const token = storedCredential();
  if (!token) {
    showIdentity("anonymous", "not signed in");
    return null;
  }
  showIdentity("pending", "signing in…");
  return { type: "auth", token };
}

// The gateway's `authenticated`: who this connection is; after a wallet sign-in, the session
// token to present from now on.
export function authenticated(message) {
  if (message.token) store(message.token);
  ui.principal.textContent = message.principal;
  ui.wallet.textContent = message.wallet ?? "—";
  showIdentity("signed-in", "signed in");
}

// The gateway refused the credential (`unauthorized`): forget it.
export function refused() {
  store(null);
  showIdentity("anonymous", "not signed in");
}

// `restart()` opens a new connection (which presents the new credential first); `showError`
// is the page's error banner.
export function initSignIn({ restart, showError }) {
  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = ui.credential.value.trim();
    ui.credential.value = "";
    if (!token) return;
    store(token);
    restart();
  });
  ui.signOut.addEventListener("click", () => {
    store(null);
    restart();
  });
  const provider = window.ethereum;
  ui.walletButton.hidden = !provider;
  ui.walletButton.addEventListener("click", async () => {
    ui.walletButton.disabled = true;
    try {
      pendingProof = await signWithWallet(provider);
      restart();
    } catch (error) {
      showError(error.code ?? "sign_in_failed", error.message ?? String(error));
    } finally {
      ui.walletButton.disabled = false;
    }
  });
}
