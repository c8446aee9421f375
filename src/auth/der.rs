//! Reading an RSA public key's modulus and exponent from DER, in either of the two encodings PEM
//! files carry: `SubjectPublicKeyInfo` (`BEGIN PUBLIC KEY`) and PKCS#1 `RSAPublicKey`
//! (`BEGIN RSA PUBLIC KEY`). Only definite-length DER is accepted; every length is bounds-checked.

/// DER OID 1.2.840.113549.1.1.1 (rsaEncryption), content bytes only.
const RSA_ENCRYPTION_OID: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// Reads one TLV; returns (tag, contents, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, content, rest) = tlv(input)?;
    (t == tag).then_some((content, rest))
}

fn unsigned(int: &[u8]) -> &[u8] {
    let start = int.iter().position(|&b| b != 0).unwrap_or(int.len());
    &int[start..]
}

/// Parses a PKCS#1 `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }`.
fn pkcs1(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (seq, _) = expect(der, 0x30)?;
    let (n, rest) = expect(seq, 0x02)?;
    let (e, _) = expect(rest, 0x02)?;
    Some((unsigned(n).to_vec(), unsigned(e).to_vec()))
}

/// Returns `(n, e)` big-endian without leading zeros, from SPKI or PKCS#1 DER.
pub fn rsa_public_key(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (seq, _) = expect(der, 0x30)?;
    // SPKI starts with an AlgorithmIdentifier SEQUENCE; PKCS#1 starts with an INTEGER.
    if let Some((alg, rest)) = expect(seq, 0x30) {
        let (oid, _) = expect(alg, 0x06)?;
        if oid != RSA_ENCRYPTION_OID {
            return None;
        }
        let (bits, _) = expect(rest, 0x03)?;
        let (&unused, key) = bits.split_first()?;
        if unused != 0 {
            return None;
        }
        return pkcs1(key);
    }
    pkcs1(der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_truncations_of_a_valid_key() {
        // SEQUENCE { INTEGER 0x00C5, INTEGER 0x010001 }
        let der = [
            0x30, 0x09, 0x02, 0x02, 0x00, 0xc5, 0x02, 0x03, 0x01, 0x00, 0x01,
        ];
        assert_eq!(rsa_public_key(&der), Some((vec![0xc5], vec![1, 0, 1])));
        for cut in 0..der.len() {
            assert!(rsa_public_key(&der[..cut]).is_none(), "cut {cut}");
        }
    }

    #[test]
    fn refuses_non_rsa_spki() {
        // AlgorithmIdentifier with the EC OID 1.2.840.10045.2.1.
        let der = [
            0x30, 0x0f, 0x30, 0x09, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x03,
            0x02, 0x00, 0x00,
        ];
        assert!(rsa_public_key(&der).is_none());
    }
}
