//! A small JSON reader and writer that keeps what the contract needs and general-purpose
//! libraries blur: integer literals versus fractions (`12` versus `12.0`, docs/SPEC.md
//! section 1), integers beyond 64 bits (sums are 128-bit), and strings holding a lone
//! surrogate (readable JSON, but not an identifier).

use std::collections::BTreeMap;

/// A JSON (or MessagePack) value.
#[derive(Debug, Clone, PartialEq)]
pub enum J {
    Null,
    Bool(bool),
    Num(Num),
    /// `None`: text that is not Unicode (a lone surrogate escape, MessagePack bytes that are not
    /// UTF-8); such a string can be skipped but never used.
    Str(Option<String>),
    Arr(Vec<J>),
    /// A repeated key keeps its last value, as Python's `dict` does.
    Obj(BTreeMap<String, J>),
    /// Valid input that no field of the contract may hold: an object with a key that is not a
    /// string (MessagePack) or not Unicode (a lone surrogate escape), binary or extension data.
    /// Such a value is only acceptable where it is ignored (docs/SPEC.md section 1).
    Other,
}

/// A number as written: integer literals stay exact, anything with a fraction or an exponent
/// is a float (the contract only asks whether it is one).
#[derive(Debug, Clone, PartialEq)]
pub enum Num {
    Int(i128),
    /// An integer literal outside the 128-bit range, kept as written.
    BigInt(String),
    Float(f64),
}

impl J {
    pub fn get(&self, key: &str) -> Option<&J> {
        match self {
            J::Obj(m) => m.get(key),
            _ => None,
        }
    }

    pub fn str(&self) -> Option<&str> {
        match self {
            J::Str(Some(s)) => Some(s),
            _ => None,
        }
    }

    pub fn int(v: i128) -> J {
        J::Num(Num::Int(v))
    }

    pub fn string(s: &str) -> J {
        J::Str(Some(s.to_string()))
    }

    /// Compact JSON text.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            J::Null | J::Other | J::Str(None) => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(Num::Int(v)) => out.push_str(&v.to_string()),
            J::Num(Num::BigInt(s)) => out.push_str(s),
            J::Num(Num::Float(f)) => out.push_str(&format!("{f:?}")),
            J::Str(Some(s)) => write_str(s, out),
            J::Arr(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write(out);
                }
                out.push(']');
            }
            J::Obj(m) => {
                out.push('{');
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(k, out);
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }
}

fn write_str(s: &str, out: &mut String) {
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
}

/// Nesting deeper than this is refused rather than risking the stack. Python's `json` (the
/// oracle) stops near 1000 levels too; the engine skips ignored keys at any depth, so a record
/// nesting deeper than this in an ignored key is the one place the model is stricter.
const MAX_DEPTH: usize = 900;

/// Parses one JSON text (surrounding whitespace allowed, nothing else after it). `None` when
/// it is not JSON: the grammar of RFC 8259, as strict as Python's `json.loads` with `NaN` and
/// `Infinity` refused.
pub fn parse(text: &str) -> Option<J> {
    let mut p = Parser {
        text,
        b: text.as_bytes(),
        i: 0,
    };
    let v = p.value(0)?;
    p.ws();
    (p.i == p.b.len()).then_some(v)
}

struct Parser<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        let hit = self.b.get(self.i) == Some(&c);
        if hit {
            self.i += 1;
        }
        hit
    }

    fn literal(&mut self, word: &str, v: J) -> Option<J> {
        let end = self.i + word.len();
        (self.b.get(self.i..end) == Some(word.as_bytes())).then(|| {
            self.i = end;
            v
        })
    }

    fn value(&mut self, depth: usize) -> Option<J> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.ws();
        match *self.b.get(self.i)? {
            b'{' => {
                self.i += 1;
                let mut m = BTreeMap::new();
                let mut bad_key = false;
                let done = |m: BTreeMap<String, J>, bad_key: bool| {
                    Some(if bad_key { J::Other } else { J::Obj(m) })
                };
                if self.eat(b'}') {
                    return done(m, bad_key);
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    if !self.eat(b':') {
                        return None;
                    }
                    let v = self.value(depth + 1)?;
                    match key {
                        Some(k) => {
                            m.insert(k, v);
                        }
                        None => bad_key = true,
                    }
                    if self.eat(b'}') {
                        return done(m, bad_key);
                    }
                    if !self.eat(b',') {
                        return None;
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                if self.eat(b']') {
                    return Some(J::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    if self.eat(b']') {
                        return Some(J::Arr(items));
                    }
                    if !self.eat(b',') {
                        return None;
                    }
                }
            }
            b'"' => self.string().map(J::Str),
            b't' => self.literal("true", J::Bool(true)),
            b'f' => self.literal("false", J::Bool(false)),
            b'n' => self.literal("null", J::Null),
            _ => self.number(),
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<J> {
        let start = self.i;
        let digits = |p: &mut Self| {
            let s = p.i;
            while p.b.get(p.i).is_some_and(u8::is_ascii_digit) {
                p.i += 1;
            }
            p.i - s
        };
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        let int_start = self.i;
        let n = digits(self);
        if n == 0 || (n > 1 && self.b[int_start] == b'0') {
            return None;
        }
        let mut float = false;
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            float = true;
            if digits(self) == 0 {
                return None;
            }
        }
        if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            float = true;
            if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return None;
            }
        }
        let text = std::str::from_utf8(&self.b[start..self.i]).ok()?;
        Some(J::Num(if float {
            Num::Float(text.parse().ok()?)
        } else {
            match text.parse::<i128>() {
                Ok(v) => Num::Int(v),
                Err(_) => Num::BigInt(text.to_string()),
            }
        }))
    }

    /// A string at `self.i` (which must be `"`); `Some(None)` when it holds a lone surrogate.
    fn string(&mut self) -> Option<Option<String>> {
        if self.b.get(self.i) != Some(&b'"') {
            return None;
        }
        self.i += 1;
        let mut units: Vec<u16> = Vec::new();
        loop {
            let c = *self.b.get(self.i)?;
            match c {
                b'"' => {
                    self.i += 1;
                    return Some(String::from_utf16(&units).ok());
                }
                b'\\' => {
                    let e = *self.b.get(self.i + 1)?;
                    self.i += 2;
                    let unit = match e {
                        b'"' => 0x22,
                        b'\\' => 0x5c,
                        b'/' => 0x2f,
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => 0x0a,
                        b'r' => 0x0d,
                        b't' => 0x09,
                        b'u' => {
                            let hex = self.b.get(self.i..self.i + 4)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.i += 4;
                            u16::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?
                        }
                        _ => return None,
                    };
                    units.push(unit);
                }
                // Raw control characters are not allowed inside a string.
                0x00..=0x1f => return None,
                _ => {
                    // One whole character: `i` is at a character boundary of the text.
                    let ch = self.text.get(self.i..)?.chars().next()?;
                    let mut buf = [0u16; 2];
                    units.extend_from_slice(ch.encode_utf16(&mut buf));
                    self.i += ch.len_utf8();
                }
            }
        }
    }
}

/// Decodes one MessagePack value that must fill `bytes` exactly, nested at most as deep as
/// docs/SPEC.md section 1 allows (rmpv's depth 256).
pub fn parse_msgpack(bytes: &[u8]) -> Option<J> {
    let mut rest = bytes;
    let v = rmpv::decode::read_value_with_max_depth(&mut rest, 256).ok()?;
    rest.is_empty().then(|| from_msgpack(v))
}

fn from_msgpack(v: rmpv::Value) -> J {
    use rmpv::Value as V;
    match v {
        V::Nil => J::Null,
        V::Boolean(b) => J::Bool(b),
        V::Integer(i) => match (i.as_i64(), i.as_u64()) {
            (Some(v), _) => J::int(v as i128),
            (None, Some(v)) => J::int(v as i128),
            _ => J::Other,
        },
        V::F32(f) => J::Num(Num::Float(f as f64)),
        V::F64(f) => J::Num(Num::Float(f)),
        V::String(s) => J::Str(s.into_str()),
        V::Array(items) => J::Arr(items.into_iter().map(from_msgpack).collect()),
        V::Map(pairs) => {
            let mut m = BTreeMap::new();
            for (k, v) in pairs {
                match k {
                    V::String(s) => match s.into_str() {
                        Some(key) => {
                            m.insert(key, from_msgpack(v));
                        }
                        None => return J::Other,
                    },
                    _ => return J::Other,
                }
            }
            J::Obj(m)
        }
        V::Binary(_) | V::Ext(..) => J::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_their_kind() {
        assert_eq!(parse("12"), Some(J::int(12)));
        assert_eq!(parse("-0"), Some(J::int(0)));
        assert!(matches!(parse("12.0"), Some(J::Num(Num::Float(_)))));
        assert!(matches!(parse("1e3"), Some(J::Num(Num::Float(_)))));
        assert!(matches!(
            parse("1234567890123456789012345678901234567890"),
            Some(J::Num(Num::BigInt(_)))
        ));
        for bad in ["01", "1.", ".5", "-", "NaN", "Infinity", "+1", "1e"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn strings_and_objects() {
        let v = parse(r#" {"a": "x\u00e9\ud83d\ude00", "a": 2, "b": [true, null]} "#).unwrap();
        assert_eq!(v.get("a"), Some(&J::int(2)));
        assert_eq!(parse(r#""\ud800""#), Some(J::Str(None)));
        assert_eq!(parse("\"a\u{1}\""), None);
        assert_eq!(parse("\u{feff}{}"), None);
        assert_eq!(parse("{} {}"), None);
        let text = r#"{"k":"q\"\\é","n":-3}"#;
        assert_eq!(parse(text).unwrap().to_text(), text);
    }
}
