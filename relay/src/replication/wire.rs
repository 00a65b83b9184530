//! A bounds-checked reader over one received message body.
//!
//! Every read checks the remaining length first, so a truncated or corrupt message from the server
//! becomes a [`DecodeError`] naming what was being read, never a panic.

use bytes::Bytes;

/// A message from the server did not have the shape the protocol promises.
#[derive(Debug, thiserror::Error)]
#[error("malformed {context}: {problem}")]
pub struct DecodeError {
    pub context: &'static str,
    pub problem: String,
}

impl DecodeError {
    pub fn new(context: &'static str, problem: impl Into<String>) -> Self {
        DecodeError {
            context,
            problem: problem.into(),
        }
    }
}

/// Reads big-endian integers, C strings and byte slices from a shared buffer without copying.
pub struct WireReader {
    buf: Bytes,
    pos: usize,
    context: &'static str,
}

impl WireReader {
    pub fn new(buf: Bytes, context: &'static str) -> Self {
        WireReader {
            buf,
            pos: 0,
            context,
        }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::new(
                self.context,
                format!(
                    "truncated while reading {what}: needed {n} bytes at offset {}, {} left",
                    self.pos,
                    self.remaining()
                ),
            ));
        }
        let start = self.pos;
        self.pos += n;
        Ok(&self.buf[start..self.pos])
    }

    pub fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    pub fn i16(&mut self, what: &str) -> Result<i16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(self.i32(what)? as u32)
    }

    pub fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    pub fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(self.i64(what)? as u64)
    }

    /// A zero-terminated UTF-8 string.
    pub fn cstr(&mut self, what: &str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let Some(len) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::new(
                self.context,
                format!("{what} is not zero-terminated"),
            ));
        };
        let s = std::str::from_utf8(&rest[..len])
            .map_err(|_| DecodeError::new(self.context, format!("{what} is not valid UTF-8")))?
            .to_owned();
        self.pos += len + 1;
        Ok(s)
    }

    /// `n` bytes as a slice of the shared buffer (no copy).
    pub fn bytes(&mut self, n: usize, what: &str) -> Result<Bytes, DecodeError> {
        self.take(n, what)?;
        Ok(self.buf.slice(self.pos - n..self.pos))
    }

    /// Everything not read yet (no copy).
    pub fn rest(&mut self) -> Bytes {
        let out = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_order_and_reports_truncation() {
        let mut r = WireReader::new(
            Bytes::from_static(b"\x01\x00\x02\x00\x00\x00\x03ab\0xyz"),
            "test",
        );
        assert_eq!(r.u8("a").unwrap(), 1);
        assert_eq!(r.i16("b").unwrap(), 2);
        assert_eq!(r.i32("c").unwrap(), 3);
        assert_eq!(r.cstr("d").unwrap(), "ab");
        assert_eq!(&r.bytes(2, "e").unwrap()[..], b"xy");
        let err = r.i32("f").unwrap_err();
        assert!(
            err.to_string().contains("truncated while reading f"),
            "{err}"
        );
        assert_eq!(&r.rest()[..], b"z");
    }

    #[test]
    fn unterminated_string_is_an_error() {
        let mut r = WireReader::new(Bytes::from_static(b"abc"), "test");
        assert!(r.cstr("name").is_err());
    }
}
