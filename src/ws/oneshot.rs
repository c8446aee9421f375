//! A one-shot DEFLATE encoder (RFC 1951) for small, standalone messages: what
//! `permessage-deflate` with `server_no_context_takeover` sends, one event at a time.
//!
//! A streaming compressor carries state between messages that must be cleared before each one
//! (zlib-rs zeroes a 128 KiB hash table, about 4.8 µs, more than compressing a 240-byte event
//! takes). This encoder keeps nothing between messages that needs clearing: its match table is
//! tagged with a message counter, so an entry from an earlier message is simply not a match.
//!
//! One block per message: greedy LZ77 matching over a 4,096-entry hash of three bytes (one
//! candidate per hash, distances up to 32 KiB), then the cheaper of a dynamic Huffman block (code
//! lengths limited to 15 bits, built per message) and a fixed one, ended as a sync flush does:
//! an empty stored block's header and padding, whose `00 00 ff ff` the receiver adds back (RFC
//! 7692 §7.2.1). The output inflates with any RFC 1951 inflater (the tests use zlib-rs's; the
//! end-to-end tests use Node's and Chromium's).

/// log2 of the match table's size.
const HASH_BITS: u32 = 12;
const HASH_SIZE: usize = 1 << HASH_BITS;
/// DEFLATE's window.
const MAX_DISTANCE: usize = 32 * 1024;
const MIN_MATCH: usize = 3;
const MAX_MATCH: usize = 258;
/// Inputs this encoder takes (the match table stores 32-bit positions); larger go elsewhere.
pub const MAX_INPUT: usize = 1 << 24;

/// Base lengths of length codes 257..=285, and their extra bits.
const LENGTH_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LENGTH_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
/// Base distances of distance codes 0..=29, and their extra bits.
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
/// The order in which code-length code lengths are sent.
const CL_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// A literal (`dist == 0`, `len` the byte) or a match.
#[derive(Clone, Copy, Debug)]
struct Sym {
    len: u16,
    dist: u16,
}

/// The encoder. Holds its buffers and match table between messages; nothing in them needs
/// clearing.
pub struct OneShot {
    /// Per hash: the message counter (high 32 bits) and the position (low 32) last seen.
    table: Box<[u64]>,
    /// Counts messages; entries of other messages do not match.
    stamp: u32,
    syms: Vec<Sym>,
    tree: Tree,
    /// The code lengths of a dynamic header, and their run-length encoding.
    all: Vec<u8>,
    rle: Vec<(u8, u8)>,
}

impl Default for OneShot {
    fn default() -> Self {
        OneShot {
            table: vec![0; HASH_SIZE].into_boxed_slice(),
            stamp: 0,
            syms: Vec::new(),
            tree: Tree::default(),
            all: Vec::new(),
            rle: Vec::new(),
        }
    }
}

/// Writes bits least significant first, as DEFLATE packs them.
struct Bits<'a> {
    out: &'a mut Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits<'_> {
    #[inline]
    fn put(&mut self, value: u32, bits: u32) {
        debug_assert!(bits <= 32 && (bits == 32 || value >> bits == 0));
        self.acc |= (value as u64) << self.n;
        self.n += bits;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// Pads to a byte boundary with zero bits.
    fn align(&mut self) {
        if self.n > 0 {
            self.out.push(self.acc as u8);
            self.acc = 0;
            self.n = 0;
        }
    }
}

fn length_code(len: usize) -> usize {
    // The largest base not above `len` (258 has its own code).
    if len == MAX_MATCH {
        return 28;
    }
    LENGTH_BASE.partition_point(|&b| b as usize <= len) - 1
}

fn dist_code(dist: usize) -> usize {
    DIST_BASE.partition_point(|&b| b as usize <= dist) - 1
}

#[inline]
fn hash3(b: &[u8]) -> usize {
    let v = (b[0] as u32) | (b[1] as u32) << 8 | (b[2] as u32) << 16;
    (v.wrapping_mul(0x9E37_79B1) >> (32 - HASH_BITS)) as usize
}

/// Most symbols of any alphabet here (literal/length: 286).
const MAX_SYMBOLS: usize = 286;

/// Buffers a code-length computation reuses (nothing allocated per message once warm).
#[derive(Default)]
struct Tree {
    used: Vec<u64>,
    parent: Vec<u16>,
    weight: Vec<u64>,
    depth: Vec<u8>,
}

/// Huffman code lengths for `freq`, none longer than `limit`; symbols of zero frequency get 0.
/// At least two symbols get a code (an inflater needs a complete code, as zlib's encoder
/// ensures), so a lone symbol is paired with a neighbour. No allocation: it runs three times
/// per message.
fn code_lengths(freq: &[u32], limit: u8, lengths: &mut [u8], t: &mut Tree) {
    debug_assert!(freq.len() <= MAX_SYMBOLS && lengths.len() >= freq.len());
    lengths.iter_mut().for_each(|l| *l = 0);
    // (frequency << 16 | symbol), sorted: one primitive key.
    let used = &mut t.used;
    used.clear();
    for (s, &f) in freq.iter().enumerate() {
        if f > 0 {
            used.push((f as u64) << 16 | s as u64);
        }
    }
    let mut filler = 0u64;
    while used.len() < 2 {
        // A neighbour that is not used, with the smallest weight.
        while used.iter().any(|&u| u & 0xffff == filler) {
            filler += 1;
        }
        used.push(1 << 16 | filler);
    }
    let n = used.len();
    used.sort_unstable();
    // Depths from a Huffman tree built over the sorted weights (two queues: leaves, then
    // merged nodes, both ascending).
    let (parent, weight, depth) = (&mut t.parent, &mut t.weight, &mut t.depth);
    parent.clear();
    parent.resize(2 * n - 1, 0);
    weight.clear();
    weight.extend(used.iter().map(|&u| u >> 16));
    weight.resize(2 * n - 1, 0);
    let (mut leaf, mut node, mut next) = (0usize, n, n);
    while next < 2 * n - 1 {
        let mut pick = || {
            if leaf < n && (node >= next || weight[leaf] <= weight[node]) {
                leaf += 1;
                leaf - 1
            } else {
                node += 1;
                node - 1
            }
        };
        let (a, b) = (pick(), pick());
        weight[next] = weight[a] + weight[b];
        parent[a] = next as u16;
        parent[b] = next as u16;
        next += 1;
    }
    depth.clear();
    depth.resize(2 * n - 1, 0);
    for i in (0..2 * n - 2).rev() {
        depth[i] = depth[parent[i] as usize] + 1;
    }
    // How many codes of each length, then limited as zlib and miniz limit them: overlong codes
    // move to the limit, and codes are lengthened until Kraft's sum is exact again.
    let mut count = [0u32; MAX_SYMBOLS + 1];
    for &d in &depth[..n] {
        count[d as usize] += 1;
    }
    let limit = limit as usize;
    let over: u32 = count[limit + 1..].iter().sum();
    if over > 0 {
        count[limit] += over;
        count[limit + 1..].iter_mut().for_each(|c| *c = 0);
        let kraft =
            |count: &[u32]| -> u64 { (1..=limit).map(|l| (count[l] as u64) << (limit - l)).sum() };
        let mut total = kraft(&count);
        while total > 1 << limit {
            count[limit] -= 1;
            for l in (1..limit).rev() {
                if count[l] > 0 {
                    count[l] -= 1;
                    count[l + 1] += 2;
                    break;
                }
            }
            total = kraft(&count);
        }
    }
    // The rarest symbols get the longest codes.
    let mut i = 0;
    for l in (1..=limit).rev() {
        for _ in 0..count[l] {
            lengths[(used[i] & 0xffff) as usize] = l as u8;
            i += 1;
        }
    }
}

/// Canonical codes for `lengths` (RFC 1951 §3.2.2), bit-reversed for LSB-first writing.
fn canonical(lengths: &[u8], codes: &mut [u16]) {
    let mut bl_count = [0u16; 16];
    for &l in lengths {
        bl_count[l as usize] += 1;
    }
    bl_count[0] = 0;
    let mut next = [0u16; 16];
    let mut code = 0u16;
    for bits in 1..16 {
        code = (code + bl_count[bits - 1]) << 1;
        next[bits] = code;
    }
    for (s, &l) in lengths.iter().enumerate() {
        if l > 0 {
            let c = next[l as usize];
            next[l as usize] += 1;
            codes[s] = c.reverse_bits() >> (16 - l);
        }
    }
}

/// The fixed code lengths (RFC 1951 §3.2.6).
const FIXED_LIT: [u8; 288] = {
    let mut lit = [8u8; 288];
    let mut s = 144;
    while s < 256 {
        lit[s] = 9;
        s += 1;
    }
    while s < 280 {
        lit[s] = 7;
        s += 1;
    }
    lit
};
const FIXED_DIST: [u8; 30] = [5; 30];

impl OneShot {
    /// Compresses `input` as one standalone `permessage-deflate` message body (the sync flush's
    /// `00 00 ff ff` left off), appending to `out`.
    pub fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) {
        assert!(input.len() <= MAX_INPUT, "one-shot input too large");
        self.find_matches(input);
        let mut lit_freq = [0u32; 286];
        let mut dist_freq = [0u32; 30];
        for s in &self.syms {
            if s.dist == 0 {
                lit_freq[s.len as usize] += 1;
            } else {
                lit_freq[257 + length_code(s.len as usize)] += 1;
                dist_freq[dist_code(s.dist as usize)] += 1;
            }
        }
        lit_freq[256] = 1;
        let mut lit_len = [0u8; 286];
        let mut dist_len = [0u8; 30];
        code_lengths(&lit_freq, 15, &mut lit_len, &mut self.tree);
        code_lengths(&dist_freq, 15, &mut dist_len, &mut self.tree);
        let header = self.dynamic_header(&lit_len, &dist_len);
        let cost = |ll: &[u8], dl: &[u8]| -> u64 {
            let mut bits = 0u64;
            for (s, &f) in lit_freq.iter().enumerate() {
                let extra = if s > 256 { LENGTH_EXTRA[s - 257] } else { 0 };
                bits += f as u64 * (ll[s] as u64 + extra as u64);
            }
            for (d, &f) in dist_freq.iter().enumerate() {
                bits += f as u64 * (dl[d] as u64 + DIST_EXTRA[d] as u64);
            }
            bits
        };
        let (fixed_lit, fixed_dist) = (&FIXED_LIT, &FIXED_DIST);
        let dynamic_bits = header.bits + cost(&lit_len, &dist_len);
        let fixed_bits = cost(&fixed_lit[..286], fixed_dist);
        let mut w = Bits { out, acc: 0, n: 0 };
        if dynamic_bits < fixed_bits {
            w.put(0, 1); // BFINAL 0: the message's end is the sync flush below
            w.put(2, 2); // dynamic Huffman
            header.write(&mut w, &self.rle);
            self.write_symbols(&mut w, &lit_len, &dist_len);
        } else {
            w.put(0, 1);
            w.put(1, 2); // fixed Huffman
                         // The fixed code is defined over all 288 symbols: its canonical codes need them all.
            self.write_symbols(&mut w, fixed_lit, fixed_dist);
        }
        // A sync flush: an empty stored block's header, padded; its LEN and NLEN (00 00 ff ff)
        // are what RFC 7692 leaves off and the receiver adds back.
        w.put(0, 3);
        w.align();
    }

    /// Greedy LZ77 into `self.syms`.
    fn find_matches(&mut self, input: &[u8]) {
        self.syms.clear();
        self.stamp = self.stamp.wrapping_add(1);
        let stamp = (self.stamp as u64) << 32;
        let n = input.len();
        let mut i = 0;
        while i < n {
            if i + MIN_MATCH <= n {
                let h = hash3(&input[i..]);
                let entry = self.table[h];
                self.table[h] = stamp | i as u64;
                // An entry of this message's stamp is a hint, not a promise (after 2^32 messages
                // the stamp comes round again): the position must be behind this one, and the
                // bytes are compared anyway.
                let cand = (entry & 0xffff_ffff) as usize;
                if entry >> 32 == stamp >> 32 && cand < i {
                    let dist = i - cand;
                    if dist <= MAX_DISTANCE && input[cand..cand + 3] == input[i..i + 3] {
                        let max = (n - i).min(MAX_MATCH);
                        let mut len = 3;
                        while len < max && input[cand + len] == input[i + len] {
                            len += 1;
                        }
                        self.syms.push(Sym {
                            len: len as u16,
                            dist: dist as u16,
                        });
                        // The positions inside the match join the table too.
                        let end = (i + len).min(n.saturating_sub(MIN_MATCH - 1));
                        for j in i + 1..end {
                            self.table[hash3(&input[j..])] = stamp | j as u64;
                        }
                        i += len;
                        continue;
                    }
                }
            }
            self.syms.push(Sym {
                len: input[i] as u16,
                dist: 0,
            });
            i += 1;
        }
    }

    fn write_symbols(&self, w: &mut Bits<'_>, lit_len: &[u8], dist_len: &[u8]) {
        let mut lit_code = [0u16; 288];
        let mut dist_code_ = [0u16; 30];
        canonical(lit_len, &mut lit_code[..lit_len.len()]);
        canonical(dist_len, &mut dist_code_);
        for s in &self.syms {
            if s.dist == 0 {
                let b = s.len as usize;
                w.put(lit_code[b] as u32, lit_len[b] as u32);
            } else {
                let len = s.len as usize;
                let lc = length_code(len);
                w.put(lit_code[257 + lc] as u32, lit_len[257 + lc] as u32);
                w.put(
                    (len - LENGTH_BASE[lc] as usize) as u32,
                    LENGTH_EXTRA[lc] as u32,
                );
                let dist = s.dist as usize;
                let dc = dist_code(dist);
                w.put(dist_code_[dc] as u32, dist_len[dc] as u32);
                w.put(
                    (dist - DIST_BASE[dc] as usize) as u32,
                    DIST_EXTRA[dc] as u32,
                );
            }
        }
        w.put(lit_code[256] as u32, lit_len[256] as u32);
    }

    /// A dynamic block's header; its run-length encoded code lengths go to `self.rle`.
    fn dynamic_header(&mut self, lit_len: &[u8], dist_len: &[u8]) -> Header {
        let hlit = 257.max(lit_len.iter().rposition(|&l| l > 0).map_or(0, |p| p + 1));
        let hdist = 1.max(dist_len.iter().rposition(|&l| l > 0).map_or(0, |p| p + 1));
        let all = &mut self.all;
        all.clear();
        all.extend_from_slice(&lit_len[..hlit]);
        all.extend_from_slice(&dist_len[..hdist]);
        // Run-length encoded with codes 16 (repeat the previous 3-6 times), 17 (3-10 zeros) and
        // 18 (11-138 zeros).
        let rle = &mut self.rle;
        rle.clear();
        let mut i = 0;
        while i < all.len() {
            let l = all[i];
            let mut run = 1;
            while i + run < all.len() && all[i + run] == l {
                run += 1;
            }
            let mut left = run;
            if l == 0 {
                while left >= 11 {
                    let k = left.min(138);
                    rle.push((18, (k - 11) as u8));
                    left -= k;
                }
                if left >= 3 {
                    rle.push((17, (left - 3) as u8));
                    left = 0;
                }
            } else {
                rle.push((l, 0));
                left -= 1;
                while left >= 3 {
                    let k = left.min(6);
                    rle.push((16, (k - 3) as u8));
                    left -= k;
                }
            }
            for _ in 0..left {
                rle.push((l, 0));
            }
            i += run;
        }
        let mut cl_freq = [0u32; 19];
        for &(c, _) in rle.iter() {
            cl_freq[c as usize] += 1;
        }
        let mut cl_len = [0u8; 19];
        code_lengths(&cl_freq, 7, &mut cl_len, &mut self.tree);
        let hclen = 4.max(
            CL_ORDER
                .iter()
                .rposition(|&s| cl_len[s] > 0)
                .map_or(0, |p| p + 1),
        );
        let mut bits = 5 + 5 + 4 + 3 * hclen as u64;
        for &(c, _) in self.rle.iter() {
            bits += cl_len[c as usize] as u64
                + match c {
                    16 => 2,
                    17 => 3,
                    18 => 7,
                    _ => 0,
                };
        }
        Header {
            hlit,
            hdist,
            hclen,
            cl_len,
            bits,
        }
    }
}

/// A dynamic block's header, ready to write, and its size in bits.
struct Header {
    hlit: usize,
    hdist: usize,
    hclen: usize,
    cl_len: [u8; 19],
    bits: u64,
}

impl Header {
    fn write(&self, w: &mut Bits<'_>, rle: &[(u8, u8)]) {
        w.put((self.hlit - 257) as u32, 5);
        w.put((self.hdist - 1) as u32, 5);
        w.put((self.hclen - 4) as u32, 4);
        for &s in &CL_ORDER[..self.hclen] {
            w.put(self.cl_len[s] as u32, 3);
        }
        let mut cl_code = [0u16; 19];
        canonical(&self.cl_len, &mut cl_code);
        for &(c, extra) in rle {
            w.put(cl_code[c as usize] as u32, self.cl_len[c as usize] as u32);
            match c {
                16 => w.put(extra as u32, 2),
                17 => w.put(extra as u32, 3),
                18 => w.put(extra as u32, 7),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What an RFC 7692 receiver does: add the tail back, inflate raw DEFLATE.
    fn inflate(body: &[u8]) -> Vec<u8> {
        let mut input = body.to_vec();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut d = flate2::Decompress::new(false);
        let mut out = Vec::with_capacity(input.len() * 8 + 1024);
        loop {
            let before = d.total_in();
            let status = d
                .decompress_vec(
                    &input[d.total_in() as usize..],
                    &mut out,
                    flate2::FlushDecompress::Sync,
                )
                .expect("valid DEFLATE");
            if d.total_in() as usize == input.len() {
                return out;
            }
            assert!(
                d.total_in() > before || out.len() == out.capacity(),
                "stuck: {status:?}"
            );
            out.reserve(out.capacity());
        }
    }

    fn round_trip(input: &[u8]) -> usize {
        let mut o = OneShot::default();
        let mut out = Vec::new();
        o.compress(input, &mut out);
        assert_eq!(inflate(&out), input, "{} bytes", input.len());
        // The same encoder again: nothing of the last message leaks into the next.
        let mut again = Vec::new();
        o.compress(input, &mut again);
        assert_eq!(again, out, "a second message compresses the same");
        out.len()
    }

    #[test]
    fn the_sample_events_shrink_and_inflate_exactly() {
        let ev = br#"{"type":"issue.created","payload":{"id":"iss_0042","title":"Payment gateway timeout on checkout","status":"new","severity":"high","risk_score":74,"source":"pagerduty","created_at":"2026-12-05T12:00:00.000Z"},"ts":"2026-12-05T12:00:00.001Z"}"#;
        let n = round_trip(ev);
        assert!(n < ev.len() * 85 / 100, "{n} of {}", ev.len());
        let rows: String = (0..90)
            .map(|i| {
                format!(
                    r#"{{"service":"svc-{i:02}","p99_ms":{},"errors":{}}},"#,
                    120 + i * 7,
                    i % 5
                )
            })
            .collect();
        let n = round_trip(rows.as_bytes());
        assert!(n < rows.len() / 3, "{n} of {}", rows.len());
    }

    #[test]
    fn edge_inputs() {
        for input in [
            &b""[..],
            b"a",
            b"ab",
            b"abc",
            b"aaaa",
            &[0u8; 1000][..],
            &[7u8; 70_000][..],
        ] {
            round_trip(input);
        }
        let all: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        round_trip(&all);
        // Matches at the far end of the window, and beyond it.
        let mut far: Vec<u8> = (0..40_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        far.extend_from_slice(&far.clone()[..1000]);
        round_trip(&far);
    }

    #[test]
    fn lengths_stay_within_their_limit() {
        // Fibonacci frequencies make the deepest Huffman trees.
        let mut freq = [0u32; 286];
        let (mut a, mut b) = (1u32, 1u32);
        for f in freq.iter_mut().take(30) {
            *f = a;
            (a, b) = (b, a.saturating_add(b));
        }
        let mut len = [0u8; 286];
        code_lengths(&freq, 15, &mut len, &mut Tree::default());
        assert!(len.iter().all(|&l| l <= 15));
        let kraft: u64 = len
            .iter()
            .filter(|&&l| l > 0)
            .map(|&l| 1u64 << (15 - l))
            .sum();
        assert_eq!(kraft, 1 << 15, "a complete code");
        let mut cl = [0u8; 19];
        code_lengths(
            &[
                1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584, 4181,
            ],
            7,
            &mut cl,
            &mut Tree::default(),
        );
        assert!(cl.iter().all(|&l| (1..=7).contains(&l)));
    }

    #[test]
    fn a_stamp_that_comes_round_again_is_harmless() {
        // Entries of a long message, then a short one under the same stamp: positions beyond the
        // short message must not be used.
        let mut o = OneShot::default();
        let long: Vec<u8> = (0..20_000u32).map(|i| (i % 97) as u8).collect();
        let mut out = Vec::new();
        o.compress(&long, &mut out);
        o.stamp = o.stamp.wrapping_sub(1);
        let short = &long[..50];
        out.clear();
        o.compress(short, &mut out);
        assert_eq!(inflate(&out), short);
    }

    proptest! {
        #[test]
        fn anything_inflates_back_exactly(input in proptest::collection::vec(any::<u8>(), 0..3000)) {
            round_trip(&input);
        }

        #[test]
        fn text_like_input_inflates_back_exactly(
            words in proptest::collection::vec(prop::sample::select(vec!["\"id\":", "title", "risk", ",", "{", "}", "2026-12-05", "a", "checkout ", "\"", "7"]), 0..400)
        ) {
            round_trip(words.concat().as_bytes());
        }
    }
}
