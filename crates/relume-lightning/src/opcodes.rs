//! Pickle opcode bytes and the integer encoding of `LONG1`/`LONG4`.

/// The opcodes the restricted reader runs (names as in CPython's `pickletools`).
pub(crate) mod op {
    pub(crate) const MARK: u8 = b'(';
    pub(crate) const STOP: u8 = b'.';
    pub(crate) const POP: u8 = b'0';
    pub(crate) const POP_MARK: u8 = b'1';
    pub(crate) const DUP: u8 = b'2';
    pub(crate) const BININT: u8 = b'J';
    pub(crate) const BININT1: u8 = b'K';
    pub(crate) const BININT2: u8 = b'M';
    pub(crate) const NONE: u8 = b'N';
    pub(crate) const BINPERSID: u8 = b'Q';
    pub(crate) const REDUCE: u8 = b'R';
    pub(crate) const BINSTRING: u8 = b'T';
    pub(crate) const SHORT_BINSTRING: u8 = b'U';
    pub(crate) const BINUNICODE: u8 = b'X';
    pub(crate) const APPEND: u8 = b'a';
    pub(crate) const BUILD: u8 = b'b';
    pub(crate) const GLOBAL: u8 = b'c';
    pub(crate) const DICT: u8 = b'd';
    pub(crate) const EMPTY_DICT: u8 = b'}';
    pub(crate) const APPENDS: u8 = b'e';
    pub(crate) const BINGET: u8 = b'h';
    pub(crate) const LONG_BINGET: u8 = b'j';
    pub(crate) const LIST: u8 = b'l';
    pub(crate) const EMPTY_LIST: u8 = b']';
    pub(crate) const BINPUT: u8 = b'q';
    pub(crate) const LONG_BINPUT: u8 = b'r';
    pub(crate) const SETITEM: u8 = b's';
    pub(crate) const TUPLE: u8 = b't';
    pub(crate) const EMPTY_TUPLE: u8 = b')';
    pub(crate) const SETITEMS: u8 = b'u';
    pub(crate) const BINFLOAT: u8 = b'G';
    pub(crate) const PROTO: u8 = 0x80;
    pub(crate) const NEWOBJ: u8 = 0x81;
    pub(crate) const TUPLE1: u8 = 0x85;
    pub(crate) const TUPLE2: u8 = 0x86;
    pub(crate) const TUPLE3: u8 = 0x87;
    pub(crate) const NEWTRUE: u8 = 0x88;
    pub(crate) const NEWFALSE: u8 = 0x89;
    pub(crate) const LONG1: u8 = 0x8a;
    pub(crate) const LONG4: u8 = 0x8b;
    pub(crate) const BINBYTES: u8 = b'B';
    pub(crate) const SHORT_BINBYTES: u8 = b'C';
    pub(crate) const SHORT_BINUNICODE: u8 = 0x8c;
    pub(crate) const BINUNICODE8: u8 = 0x8d;
    pub(crate) const BINBYTES8: u8 = 0x8e;
    pub(crate) const EMPTY_SET: u8 = 0x8f;
    pub(crate) const ADDITEMS: u8 = 0x90;
    pub(crate) const FROZENSET: u8 = 0x91;
    pub(crate) const NEWOBJ_EX: u8 = 0x92;
    pub(crate) const STACK_GLOBAL: u8 = 0x93;
    pub(crate) const MEMOIZE: u8 = 0x94;
    pub(crate) const FRAME: u8 = 0x95;
    pub(crate) const BYTEARRAY8: u8 = 0x96;
}

/// Decodes a little-endian two's-complement integer; `Err(decimal)` when it needs more
/// than 64 bits.
pub(crate) fn decode_long(bytes: &[u8]) -> std::result::Result<i64, String> {
    let Some(&last) = bytes.last() else {
        return Ok(0);
    };
    let negative = last & 0x80 != 0;
    let fill = if negative { 0xff } else { 0x00 };
    if bytes.len() <= 8 || bytes[8..].iter().all(|&b| b == fill) {
        let mut b = [fill; 8];
        let n = bytes.len().min(8);
        b[..n].copy_from_slice(&bytes[..n]);
        let v = i64::from_le_bytes(b);
        if (v < 0) == negative {
            return Ok(v);
        }
    }
    // Magnitude as little-endian bytes, then repeated division by 10^9.
    let mut mag: Vec<u8> = bytes.to_vec();
    if negative {
        let mut carry = 1u16;
        for b in &mut mag {
            let v = u16::from(!*b) + carry;
            *b = v as u8;
            carry = v >> 8;
        }
    }
    let mut limbs: Vec<u32> = mag
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(w)
        })
        .collect();
    let mut groups = Vec::new();
    while limbs.iter().any(|&l| l != 0) {
        let mut rem = 0u64;
        for l in limbs.iter_mut().rev() {
            let cur = (rem << 32) | u64::from(*l);
            *l = (cur / 1_000_000_000) as u32;
            rem = cur % 1_000_000_000;
        }
        groups.push(rem as u32);
    }
    let mut s = String::from(if negative { "-" } else { "" });
    match groups.split_last() {
        Some((top, rest)) => {
            s.push_str(&top.to_string());
            for g in rest.iter().rev() {
                s.push_str(&format!("{g:09}"));
            }
        }
        None => s.push('0'),
    }
    Err(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_long_small_and_big() {
        assert_eq!(decode_long(&[]), Ok(0));
        assert_eq!(decode_long(&[0xff]), Ok(-1));
        assert_eq!(decode_long(&[0x00, 0x01]), Ok(256));
        assert_eq!(decode_long(&[0xff, 0x00]), Ok(255));
        // 2^64 = 18446744073709551616
        let mut b = vec![0u8; 8];
        b.push(1);
        assert_eq!(decode_long(&b), Err("18446744073709551616".to_string()));
        // -(2^64)
        let mut n = vec![0u8; 8];
        n.push(0xff);
        assert_eq!(decode_long(&n), Err("-18446744073709551616".to_string()));
        // u64::MAX as 9 bytes (positive): 18446744073709551615
        let mut m = vec![0xffu8; 8];
        m.push(0);
        assert_eq!(decode_long(&m), Err("18446744073709551615".to_string()));
        assert_eq!(decode_long(&[0xff; 9]), Ok(-1));
    }
}
