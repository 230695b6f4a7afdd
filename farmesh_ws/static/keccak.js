// Keccak-256 as Ethereum uses it (the Keccak submission's padding, not SHA3-256's), written
// from the Keccak reference (FIPS 202 §3 for the step mappings). The page needs it for one
// thing: EIP-55 checksummed addresses in Sign-In with Ethereum messages. Lanes are BigInts:
// slow, but the page hashes 40 bytes once per sign-in.

const MASK = (1n << 64n) - 1n;
const RATE = 136; // bytes: 1600 - 2 * 256 bits of capacity

// Round constants from the LFSR x^8 + x^6 + x^5 + x^4 + 1 (FIPS 202 Algorithm 5).
const ROUND_CONSTANTS = (() => {
  const constants = [];
  let r = 1;
  for (let round = 0; round < 24; round++) {
    let c = 0n;
    for (let j = 0; j < 7; j++) {
      if (r & 1) c ^= 1n << BigInt((1 << j) - 1);
      r = r & 0x80 ? ((r << 1) ^ 0x71) & 0xff : (r << 1) & 0xff;
    }
    constants.push(c);
  }
  return constants;
})();

// Rotation offsets of lane x + 5y (FIPS 202 Algorithm 2, rho).
const ROTATIONS = (() => {
  const offsets = new Array(25).fill(0);
  let x = 1;
  let y = 0;
  for (let t = 0; t < 24; t++) {
    offsets[x + 5 * y] = (((t + 1) * (t + 2)) / 2) % 64;
    [x, y] = [y, (2 * x + 3 * y) % 5];
  }
  return offsets;
})();

function rotl(lane, n) {
  if (n === 0) return lane;
  const shift = BigInt(n);
  return ((lane << shift) | (lane >> (64n - shift))) & MASK;
}

function permute(a) {
  const c = new Array(5);
  const b = new Array(25);
  for (const constant of ROUND_CONSTANTS) {
    for (let x = 0; x < 5; x++) c[x] = a[x] ^ a[x + 5] ^ a[x + 10] ^ a[x + 15] ^ a[x + 20];
    for (let x = 0; x < 5; x++) {
      const d = c[(x + 4) % 5] ^ rotl(c[(x + 1) % 5], 1);
      for (let y = 0; y < 25; y += 5) a[x + y] ^= d;
    }
    for (let x = 0; x < 5; x++) {
      for (let y = 0; y < 5; y++) {
        b[y + 5 * ((2 * x + 3 * y) % 5)] = rotl(a[x + 5 * y], ROTATIONS[x + 5 * y]);
      }
    }
    for (let y = 0; y < 25; y += 5) {
      for (let x = 0; x < 5; x++) {
        a[x + y] = b[x + y] ^ (~b[((x + 1) % 5) + y] & MASK & b[((x + 2) % 5) + y]);
      }
    }
    a[0] ^= constant;
  }
}

// The 32-byte Keccak-256 digest of `bytes` (a Uint8Array).
export function keccak256(bytes) {
  const padded = new Uint8Array(Math.floor(bytes.length / RATE + 1) * RATE);
  padded.set(bytes);
  padded[bytes.length] ^= 0x01;
  padded[padded.length - 1] ^= 0x80;
  const state = new Array(25).fill(0n);
  for (let offset = 0; offset < padded.length; offset += RATE) {
    for (let i = 0; i < RATE / 8; i++) {
      let lane = 0n;
      for (let k = 7; k >= 0; k--) lane = (lane << 8n) | BigInt(padded[offset + 8 * i + k]);
      state[i] ^= lane;
    }
    permute(state);
  }
  const digest = new Uint8Array(32);
  for (let i = 0; i < 32; i++) digest[i] = Number((state[i >> 3] >> BigInt(8 * (i & 7))) & 0xffn);
  return digest;
}
