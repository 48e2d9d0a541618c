//! A small namespace-resolved element tree built with quick-xml's `NsReader`.
//!
//! Exchange uses whatever prefixes it likes (`s:`, `soap:`, `soap11:`, a default
//! namespace, `m:`/`t:`/`h:`), so everything here is keyed by namespace URI and
//! local name, never by prefix. Envelopes are small (a few KB), so parsing one
//! into a tree and then walking it is simpler and more tolerant of element order
//! than a streaming state machine, and still cheap.

use quick_xml::{
    NsReader,
    events::{BytesStart, Event},
    name::ResolveResult,
};

/// `http://schemas.xmlsoap.org/soap/envelope/` (SOAP 1.1, http, never https).
pub const SOAP: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// The EWS messages namespace (`m:`).
pub const MESSAGES: &str = "http://schemas.microsoft.com/exchange/services/2006/messages";
/// The EWS types namespace (`t:`, and `h:` for ServerVersionInfo).
pub const TYPES: &str = "http://schemas.microsoft.com/exchange/services/2006/types";
/// The EWS errors namespace (`e:`), only inside a SOAP fault's detail.
pub const ERRORS: &str = "http://schemas.microsoft.com/exchange/services/2006/errors";

/// Deepest nesting accepted; EWS documents are about ten levels deep, so this
/// only stops hostile or broken input from using unbounded memory.
const MAX_DEPTH: usize = 64;

/// Why a document could not be read.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("malformed XML at byte {position}: {message}")]
    Malformed { position: u64, message: String },
    #[error("the document has no root element")]
    Empty,
    #[error("the document ends inside <{0}>")]
    Unclosed(String),
    #[error("elements nested deeper than {MAX_DEPTH}")]
    TooDeep,
}

/// One element: its namespace URI, local name, attributes (by local name),
/// child elements and concatenated text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Element {
    pub ns: String,
    pub name: String,
    pub attributes: Vec<(String, String)>,
    pub children: Vec<Element>,
    pub text: String,
}

impl Element {
    /// True when this element is `{ns}name`.
    pub fn is(&self, ns: &str, name: &str) -> bool {
        self.ns == ns && self.name == name
    }

    /// True when this element is `name` in the messages or the types namespace.
    /// Exchange and the schema disagree about which of the two some elements
    /// (Notification, SubscriptionId, Watermark) use, so EWS lookups accept both.
    pub fn is_ews(&self, name: &str) -> bool {
        self.name == name && (self.ns == MESSAGES || self.ns == TYPES)
    }

    /// The first child named `name` in the EWS namespaces.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.is_ews(name))
    }

    /// Every child named `name` in the EWS namespaces.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.is_ews(name))
    }

    /// The first child `{ns}name`.
    pub fn child_ns(&self, ns: &str, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.is(ns, name))
    }

    /// The first descendant (depth first) named `name` in the EWS namespaces.
    pub fn find(&self, name: &str) -> Option<&Element> {
        for child in &self.children {
            if child.is_ews(name) {
                return Some(child);
            }
            if let Some(found) = child.find(name) {
                return Some(found);
            }
        }
        None
    }

    /// The trimmed text of the child `name`, if present.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.trim())
    }

    /// An attribute's value by local name.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses one complete document (an optional declaration, one root element).
pub fn parse(document: &[u8]) -> Result<Element, XmlError> {
    let mut reader = NsReader::from_reader(document);
    reader.config_mut().trim_text(false);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let malformed = |reader: &NsReader<&[u8]>, message: String| XmlError::Malformed {
        position: reader.buffer_position(),
        message,
    };
    loop {
        let (resolved, event) = reader
            .read_resolved_event()
            .map_err(|e| XmlError::Malformed {
                position: 0,
                message: e.to_string(),
            })?;
        let ns = namespace(&resolved);
        match event {
            Event::Start(start) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep);
                }
                if root.is_some() {
                    return Err(malformed(&reader, "a second root element".into()));
                }
                let element = open(&reader, ns, &start).map_err(|m| malformed(&reader, m))?;
                stack.push(element);
            }
            Event::Empty(start) => {
                let element = open(&reader, ns, &start).map_err(|m| malformed(&reader, m))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(element),
                    None if root.is_none() => root = Some(element),
                    None => return Err(malformed(&reader, "a second root element".into())),
                }
            }
            Event::End(_) => {
                let element = stack
                    .pop()
                    .ok_or_else(|| malformed(&reader, "an end tag without a start".into()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(element),
                    None => root = Some(element),
                }
            }
            Event::Text(text) => {
                let text = text
                    .xml_content()
                    .map_err(|e| malformed(&reader, e.to_string()))?;
                match stack.last_mut() {
                    Some(current) => current.text.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => return Err(malformed(&reader, "text outside the root element".into())),
                }
            }
            Event::CData(data) => {
                let data = data
                    .decode()
                    .map_err(|e| malformed(&reader, e.to_string()))?;
                if let Some(current) = stack.last_mut() {
                    current.text.push_str(&data);
                }
            }
            Event::GeneralRef(reference) => {
                let resolved = match reference
                    .resolve_char_ref()
                    .map_err(|e| malformed(&reader, e.to_string()))?
                {
                    Some(c) => c.to_string(),
                    None => {
                        let name = reference
                            .decode()
                            .map_err(|e| malformed(&reader, e.to_string()))?;
                        quick_xml::escape::resolve_xml_entity(&name)
                            .ok_or_else(|| malformed(&reader, format!("unknown entity &{name};")))?
                            .to_owned()
                    }
                };
                if let Some(current) = stack.last_mut() {
                    current.text.push_str(&resolved);
                }
            }
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) | Event::DocType(_) => {}
        }
    }
    if let Some(open) = stack.pop() {
        return Err(XmlError::Unclosed(open.name));
    }
    root.ok_or(XmlError::Empty)
}

fn namespace(resolved: &ResolveResult<'_>) -> String {
    match resolved {
        ResolveResult::Bound(ns) => String::from_utf8_lossy(ns.as_ref()).into_owned(),
        _ => String::new(),
    }
}

/// Builds an element (without children) from a start tag.
fn open(reader: &NsReader<&[u8]>, ns: String, start: &BytesStart<'_>) -> Result<Element, String> {
    let name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
    let mut attributes = Vec::new();
    for attribute in start.attributes() {
        let attribute = attribute.map_err(|e| e.to_string())?;
        let key = attribute.key;
        if key.as_namespace_binding().is_some() {
            continue;
        }
        let (_, local) = reader.resolve_attribute(key);
        let value = attribute
            .decode_and_unescape_value(reader.decoder())
            .map_err(|e| e.to_string())?;
        attributes.push((
            String::from_utf8_lossy(local.as_ref()).into_owned(),
            value.into_owned(),
        ));
    }
    Ok(Element {
        ns,
        name,
        attributes,
        children: Vec::new(),
        text: String::new(),
    })
}

/// Escapes text for an element body or a double-quoted attribute.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_namespaces_not_prefixes() {
        let doc = br#"<?xml version="1.0"?><Envelope xmlns="http://schemas.xmlsoap.org/soap/envelope/"><x:Body xmlns:x="http://schemas.xmlsoap.org/soap/envelope/"><q:Thing xmlns:q="http://schemas.microsoft.com/exchange/services/2006/messages" A="1 &amp; 2">a &lt; b</q:Thing></x:Body></Envelope>"#;
        let root = parse(doc).unwrap();
        assert!(root.is(SOAP, "Envelope"));
        let body = root.child_ns(SOAP, "Body").unwrap();
        let thing = body.child("Thing").unwrap();
        assert_eq!(thing.ns, MESSAGES);
        assert_eq!(thing.attribute("A"), Some("1 & 2"));
        assert_eq!(thing.text, "a < b");
    }

    #[test]
    fn rejects_broken_documents() {
        assert!(parse(b"<a><b></a>").is_err());
        assert!(matches!(parse(b"<a><b>"), Err(XmlError::Unclosed(_))));
        assert!(matches!(parse(b"  "), Err(XmlError::Empty)));
        assert!(parse(b"<a/><b/>").is_err());
        assert!(parse(b"<a/>junk").is_err());
    }
}
