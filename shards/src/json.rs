//! The hand-built JSON of the management API: string literals ([`json_str`]) and the check
//! that a listing row from a peer is one flat JSON object ([`flat_json_object`]) before it is
//! spliced into an answer. Shared by the shards (listing rows) and the cluster thread.

/// A JSON string literal (quotes and escapes) for the management API's hand-built JSON.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// True for a flat JSON object (`{"k":v,...}` with string, integer, `true`/`false` or `null`
/// values), which is what a listing row is. A peer's rows are spliced into the management
/// API's answer as they are, so anything else (a row that closes the array, injects rows or
/// nests without bound) is dropped.
pub fn flat_json_object(row: &str) -> bool {
    let b = row.as_bytes();
    let mut i = 0;
    // A JSON string starting at `i` (a quote); returns the index after its closing quote.
    let string = |mut i: usize| -> Option<usize> {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        i += 1;
        loop {
            match *b.get(i)? {
                b'"' => return Some(i + 1),
                b'\\' => {
                    let e = *b.get(i + 1)?;
                    if e == b'u' {
                        let hex = b.get(i + 2..i + 6)?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return None;
                        }
                        i += 6;
                    } else if b"\"\\/bfnrt".contains(&e) {
                        i += 2;
                    } else {
                        return None;
                    }
                }
                c if c < 0x20 => return None,
                _ => i += 1,
            }
        }
    };
    if b.first() != Some(&b'{') || b.last() != Some(&b'}') {
        return false;
    }
    i += 1;
    if b.get(i) == Some(&b'}') {
        return i + 1 == b.len();
    }
    loop {
        let Some(after_key) = string(i) else {
            return false;
        };
        if b.get(after_key) != Some(&b':') {
            return false;
        }
        i = after_key + 1;
        let rest = &b[i..];
        i = if rest.first() == Some(&b'"') {
            match string(i) {
                Some(j) => j,
                None => return false,
            }
        } else if let Some(word) = [&b"true"[..], b"false", b"null"]
            .into_iter()
            .find(|w| rest.starts_with(w))
        {
            i + word.len()
        } else {
            let digits = rest
                .iter()
                .enumerate()
                .take_while(|&(k, c)| c.is_ascii_digit() || (k == 0 && *c == b'-'))
                .count();
            if digits == 0 || rest[..digits] == *b"-" {
                return false;
            }
            i + digits
        };
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => return i + 1 == b.len(),
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_flat_json_objects_pass_as_listing_rows() {
        for good in [
            "{}",
            r#"{"clientid":"a\"b\u00e9","node":"n1@h","connected":true,"queued":0,"x":-3}"#,
            r#"{"k":null}"#,
        ] {
            assert!(flat_json_object(good), "{good}");
        }
        for bad in [
            "",
            "{",
            r#"{"a":1},{"b":2}"#,
            r#"{"a":1}]"#,
            r#"{"a":{"b":1}}"#,
            r#"{"a":"x\q"}"#,
            "{\"a\":\"\n\"}",
            r#"{"a":-}"#,
            r#"{"a":1,}"#,
            r#"{a:1}"#,
            r#"{"a":"\u12"}"#,
        ] {
            assert!(!flat_json_object(bad), "{bad}");
        }
    }
}
