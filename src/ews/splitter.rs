//! Splits the body of a GetStreamingEvents response into SOAP envelopes as the
//! bytes arrive.
//!
//! Exchange answers GetStreamingEvents with one chunked HTTP response holding
//! many complete envelopes back to back, with no wrapper, no separator and
//! (usually) no XML declaration. Chunk boundaries have nothing to do with
//! envelope boundaries: a chunk may end in the middle of a tag or hold several
//! envelopes. A document parser would see "text after the root element", so
//! this splitter tracks tag depth over a byte buffer and hands out each root
//! element's bytes once its closing tag has arrived; the caller then parses each
//! envelope on its own (and checks that the root is a SOAP Envelope).

use bytes::{Buf, Bytes, BytesMut};

/// Largest envelope accepted. Real event envelopes are a few KB; a stream that
/// grows past this without closing its root is broken or hostile, and is
/// treated like a dropped connection.
pub const MAX_ENVELOPE_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SplitError {
    #[error("{0:?} found between envelopes (expected '<')")]
    Garbage(String),
    #[error("an envelope grew past {MAX_ENVELOPE_BYTES} bytes without closing")]
    TooLarge,
    #[error("the stream ended inside an envelope ({0} bytes unread)")]
    Truncated(usize),
    #[error("a closing tag with no open element")]
    Unbalanced,
}

/// Incremental splitter; feed it chunks, take envelopes out.
#[derive(Debug, Default)]
pub struct EnvelopeSplitter {
    buffer: BytesMut,
    /// How far `buffer` has been scanned (always at a tag boundary or at the
    /// start of an unfinished tag).
    scanned: usize,
    /// Open elements of the current root, 0 between envelopes.
    depth: usize,
}

impl EnvelopeSplitter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one chunk of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete envelope, `Ok(None)` if more bytes are needed.
    pub fn next_envelope(&mut self) -> Result<Option<Bytes>, SplitError> {
        loop {
            if self.depth == 0 {
                self.skip_prolog()?;
            }
            let rest = &self.buffer[self.scanned..];
            let Some(lt) = rest.iter().position(|&b| b == b'<') else {
                return self.need_more();
            };
            let tag_start = self.scanned + lt;
            let Some(tag_len) = tag_length(&self.buffer[tag_start..]) else {
                self.scanned = tag_start;
                return self.need_more();
            };
            let tag = &self.buffer[tag_start..tag_start + tag_len];
            self.scanned = tag_start + tag_len;
            match classify(tag) {
                Tag::Open => self.depth += 1,
                Tag::Close => {
                    self.depth = self.depth.checked_sub(1).ok_or(SplitError::Unbalanced)?;
                    if self.depth == 0 {
                        let envelope = self.buffer.split_to(self.scanned).freeze();
                        self.scanned = 0;
                        return Ok(Some(envelope));
                    }
                }
                Tag::SelfClosing if self.depth == 0 => {
                    let envelope = self.buffer.split_to(self.scanned).freeze();
                    self.scanned = 0;
                    return Ok(Some(envelope));
                }
                Tag::SelfClosing | Tag::Other => {}
            }
        }
    }

    /// Call when the body has ended: an error if an envelope was left unfinished.
    pub fn finish(&mut self) -> Result<(), SplitError> {
        self.skip_prolog()?;
        let pending = self.buffer.len() - self.scanned.min(self.buffer.len());
        if self.depth > 0 || self.buffer.iter().any(|b| !b.is_ascii_whitespace()) {
            return Err(SplitError::Truncated(pending.max(self.buffer.len())));
        }
        Ok(())
    }

    fn need_more(&self) -> Result<Option<Bytes>, SplitError> {
        if self.buffer.len() > MAX_ENVELOPE_BYTES {
            return Err(SplitError::TooLarge);
        }
        Ok(None)
    }

    /// Between envelopes: drops whitespace, XML declarations and comments, and
    /// rejects anything else that is not the start of an element.
    fn skip_prolog(&mut self) -> Result<(), SplitError> {
        loop {
            let skip = self
                .buffer
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
            self.buffer.advance(skip);
            self.scanned = 0;
            match self.buffer.first() {
                None => return Ok(()),
                Some(b'<') => {}
                Some(_) => {
                    let shown = String::from_utf8_lossy(&self.buffer[..self.buffer.len().min(40)])
                        .into_owned();
                    return Err(SplitError::Garbage(shown));
                }
            }
            let is_prolog = self.buffer.starts_with(b"<?") || self.buffer.starts_with(b"<!--");
            if !is_prolog {
                return Ok(());
            }
            match tag_length(&self.buffer) {
                Some(len) => self.buffer.advance(len),
                None => return Ok(()),
            }
        }
    }
}

enum Tag {
    Open,
    Close,
    SelfClosing,
    Other,
}

fn classify(tag: &[u8]) -> Tag {
    if tag.starts_with(b"</") {
        Tag::Close
    } else if tag.starts_with(b"<?") || tag.starts_with(b"<!") {
        Tag::Other
    } else if tag.ends_with(b"/>") {
        Tag::SelfClosing
    } else {
        Tag::Open
    }
}

/// Length of the markup starting at `bytes[0] == b'<'`, or `None` if it is not
/// complete yet. Handles quoted attribute values, comments and CDATA.
fn tag_length(bytes: &[u8]) -> Option<usize> {
    let find = |needle: &[u8], from: usize| {
        bytes[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| from + p + needle.len())
    };
    if bytes.starts_with(b"<!--") {
        return find(b"-->", 4);
    }
    if bytes.starts_with(b"<![CDATA[") {
        return find(b"]]>", 9);
    }
    if bytes.len() < 9 && (b"<!--".starts_with(bytes) || b"<![CDATA[".starts_with(bytes)) {
        return None;
    }
    let mut quote: Option<u8> = None;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' || b == b'\'' => quote = Some(b),
            None if b == b'>' => return Some(i + 1),
            None => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = r#"<Envelope xmlns="http://schemas.xmlsoap.org/soap/envelope/"><soap11:Body xmlns:soap11="http://schemas.xmlsoap.org/soap/envelope/"><m:X xmlns:m="urn:m" a="x>y"><m:Y/>t</m:X></soap11:Body></Envelope>"#;

    fn split_all(input: &[u8], chunk: usize) -> Result<Vec<Bytes>, SplitError> {
        let mut splitter = EnvelopeSplitter::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            splitter.push(piece);
            while let Some(envelope) = splitter.next_envelope()? {
                out.push(envelope);
            }
        }
        splitter.finish()?;
        Ok(out)
    }

    #[test]
    fn splits_back_to_back_envelopes_at_any_chunk_size() {
        let body = format!("{ONE}{ONE}\r\n<?xml version=\"1.0\"?>{ONE}");
        for chunk in [1, 2, 3, 7, 64, 10_000] {
            let envelopes = split_all(body.as_bytes(), chunk).unwrap();
            assert_eq!(envelopes.len(), 3, "chunk size {chunk}");
            for envelope in envelopes {
                assert_eq!(&envelope[..], ONE.as_bytes());
            }
        }
    }

    #[test]
    fn reports_garbage_and_truncation() {
        assert!(matches!(
            split_all(format!("{ONE}garbage{ONE}").as_bytes(), 5),
            Err(SplitError::Garbage(_))
        ));
        assert!(matches!(
            split_all(&ONE.as_bytes()[..ONE.len() - 4], 3),
            Err(SplitError::Truncated(_))
        ));
        assert!(matches!(
            split_all(b"</a>", 3),
            Err(SplitError::Garbage(_)) | Err(SplitError::Unbalanced)
        ));
    }
}
