// Sign-In with Ethereum in the page (EIP-4361, protocol.md §2.1): the message text made from
// the gateway's GET /auth/nonce answer, signed by the wallet (EIP-1193 personal_sign). The
// gateway also answers the wallet's address in its EIP-55 checksummed form (wallets usually
// answer in lower case; a message must carry the checksum), so the page hashes nothing itself.

const VALID_FOR_MS = 3600 * 1000; // the message's Expiration Time: the session never outlives it

// The EIP-4361 message text, field by field as the specification's ABNF lays it out.
function siweMessage(grant, address, issuedAt) {
  const expires = new Date(issuedAt.getTime() + VALID_FOR_MS);
  const head = `${grant.domain} wants you to sign in with your Ethereum account:\n${address}\n\n`;
  const statement = grant.statement ? `${grant.statement}\n\n` : "\n";
  return head + statement + [
    `URI: ${grant.uri}`,
    "Version: 1",
    `Chain ID: ${grant.chain_id}`,
    `Nonce: ${grant.nonce}`,
    `Issued At: ${issuedAt.toISOString()}`,
    `Expiration Time: ${expires.toISOString()}`,
  ].join("\n");
}

function utf8Hex(text) {
  const bytes = new TextEncoder().encode(text);
  return "0x" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// A failure with the gateway's or the wallet's code, for the page's error banner.
export class SignInError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

// Ask the wallet for an account, the gateway for a nonce and that account's checksummed form,
// the wallet for a signature; the proof for {"type":"auth","siwe":…}.
export async function signWithWallet(provider) {
  let accounts;
  try {
    accounts = await provider.request({ method: "eth_requestAccounts" });
  } catch (error) {
    throw new SignInError("wallet_refused", error?.message ?? "the wallet refused");
  }
  if (!accounts?.length) throw new SignInError("wallet_refused", "the wallet shared no account");
  const query = new URLSearchParams({ address: String(accounts[0]) });
  const reply = await fetch(`/auth/nonce?${query}`, { cache: "no-store" });
  const grant = await reply.json().catch(() => ({}));
  if (!reply.ok) {
    throw new SignInError(grant.error ?? "http_error",
      grant.message ?? `GET /auth/nonce answered HTTP ${reply.status}`);
  }
  const message = siweMessage(grant, grant.address, new Date());
  let signature;
  try {
    signature = await provider.request({ method: "personal_sign",
      params: [utf8Hex(message), grant.address] });
  } catch (error) {
    throw new SignInError("wallet_refused", error?.message ?? "the wallet did not sign");
  }
  return { message, signature };
}
