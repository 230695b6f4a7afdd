// Sign-In with Ethereum in the page (EIP-4361, protocol.md §2.1): the message text made from
// the gateway's GET /auth/nonce answer, signed by the wallet (EIP-1193 personal_sign).

import { keccak256 } from "./keccak.js";

const VALID_FOR_MS = 3600 * 1000; // the message's Expiration Time: the session never outlives it

// An address in its EIP-55 mixed-case checksum form (wallets usually answer in lower case; the
// gateway accepts only the checksummed form in a message).
export function checksumAddress(address) {
  const hex = address.toLowerCase().replace(/^0x/, "");
  if (!/^[0-9a-f]{40}$/.test(hex)) throw new Error(`not an Ethereum address: ${address}`);
  const hash = keccak256(new TextEncoder().encode(hex));
  let out = "0x";
  for (let i = 0; i < 40; i++) {
    const nibble = (hash[i >> 1] >> (i % 2 === 0 ? 4 : 0)) & 0x0f;
    out += nibble >= 8 ? hex[i].toUpperCase() : hex[i];
  }
  return out;
}

// The EIP-4361 message text, field by field as the specification's ABNF lays it out.
export function siweMessage(grant, address, issuedAt) {
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

// Ask the wallet for an account, the gateway for a nonce, the wallet for a signature; the
// proof for {"type":"auth","siwe":…}.
export async function signWithWallet(provider) {
  let accounts;
  try {
    accounts = await provider.request({ method: "eth_requestAccounts" });
  } catch (error) {
    throw new SignInError("wallet_refused", error?.message ?? "the wallet refused");
  }
  if (!accounts?.length) throw new SignInError("wallet_refused", "the wallet shared no account");
  const reply = await fetch("/auth/nonce", { cache: "no-store" });
  const grant = await reply.json().catch(() => ({}));
  if (!reply.ok) {
    throw new SignInError(grant.error ?? "http_error",
      grant.message ?? `GET /auth/nonce answered HTTP ${reply.status}`);
  }
  const address = checksumAddress(accounts[0]);
  const message = siweMessage(grant, address, new Date());
  let signature;
  try {
    signature = await provider.request({ method: "personal_sign",
      params: [utf8Hex(message), address] });
  } catch (error) {
    throw new SignInError("wallet_refused", error?.message ?? "the wallet did not sign");
  }
  return { message, signature };
}
