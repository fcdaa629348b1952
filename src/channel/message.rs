//! The wire format: NetsUnion-style XML with an appended SM2 signature.
//!
//! `<root><MsgHeader>...</MsgHeader><MsgBody>...</MsgBody></root>{S:<base64 DER signature>}`
//!
//! Owns: splitting the signed bytes from the signature, parsing into a small bounded element
//! tree, and writing messages byte-exactly (what we sign is what we send).
//! Must never: expand entities or DTDs, accept more than the configured size, nesting depth or
//! element count, or re-serialise an inbound message before verifying it (the signature
//! covers the exact bytes as received).

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use quick_xml::events::Event;
use thiserror::Error;

pub const SIGNATURE_OPEN: &[u8] = b"{S:";
/// Limits that hold for every message whatever the size limit: a hostile message cannot make
/// the parser allocate without bound.
pub const MAX_DEPTH: usize = 5;
pub const MAX_ELEMENTS: usize = 2_000;
pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("no signature: the message must end with {{S:<base64>}}")]
    NoSignature,
    #[error("the signature suffix is not base64: {0}")]
    SignatureNotBase64(String),
    #[error("not well-formed XML at byte {position}: {reason}")]
    Xml { position: u64, reason: String },
    #[error("{0} is not allowed")]
    Forbidden(&'static str),
    #[error("the document element must be <root>, found <{0}>")]
    WrongRoot(String),
    #[error("<root> must hold <MsgHeader> then <MsgBody>, found {0}")]
    WrongLayout(String),
    #[error("element <{0}> appears twice in <{1}>")]
    Duplicate(String, String),
    #[error("nesting deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("more than {MAX_ELEMENTS} elements")]
    TooManyElements,
    #[error("attributes are not used in this protocol (on <{0}>)")]
    Attribute(String),
    #[error("the message is not UTF-8")]
    NotUtf8,
}

/// One element: its text (for leaves) and its children (for lists such as `<Txns>`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn text_of(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }
}

/// A parsed inbound message; `signed` is exactly the bytes the signature covers.
#[derive(Debug, Clone)]
pub struct SignedMessage<'a> {
    pub signed: &'a [u8],
    pub signature: Vec<u8>,
    pub header: Element,
    pub body: Element,
}

/// Splits `...{S:base64}` into the signed bytes and the decoded signature. Trailing ASCII
/// whitespace after the closing brace is tolerated (line-oriented HTTP clients add it).
pub fn split_signature(raw: &[u8]) -> Result<(&[u8], Vec<u8>), CodecError> {
    let trimmed = trim_ascii_end(raw);
    let Some(open) = find_last(trimmed, SIGNATURE_OPEN) else {
        return Err(CodecError::NoSignature);
    };
    let rest = &trimmed[open + SIGNATURE_OPEN.len()..];
    let Some(encoded) = rest.strip_suffix(b"}") else {
        return Err(CodecError::NoSignature);
    };
    let signature = BASE64
        .decode(encoded)
        .map_err(|e| CodecError::SignatureNotBase64(e.to_string()))?;
    Ok((&trimmed[..open], signature))
}

fn trim_ascii_end(bytes: &[u8]) -> &[u8] {
    let mut end = bytes.len();
    while end > 0 && bytes[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    &bytes[..end]
}

fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// Parses a signed message. Verification is the caller's next step, on `signed` as received.
pub fn parse(raw: &[u8]) -> Result<SignedMessage<'_>, CodecError> {
    let (signed, signature) = split_signature(raw)?;
    let root = parse_document(signed)?;
    if root.name != "root" {
        return Err(CodecError::WrongRoot(root.name));
    }
    let names: Vec<&str> = root.children.iter().map(|c| c.name.as_str()).collect();
    if names != ["MsgHeader", "MsgBody"] || !root.text.trim().is_empty() {
        return Err(CodecError::WrongLayout(format!("<{}>", names.join(">, <"))));
    }
    let mut children = root.children.into_iter();
    let header = children.next().expect("checked above");
    let body = children.next().expect("checked above");
    Ok(SignedMessage {
        signed,
        signature,
        header,
        body,
    })
}

/// Parses an XML document into a bounded element tree.
pub fn parse_document(xml: &[u8]) -> Result<Element, CodecError> {
    let text = std::str::from_utf8(xml).map_err(|_| CodecError::NotUtf8)?;
    let mut reader = quick_xml::Reader::from_str(text);
    reader.config_mut().trim_text(false);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut count = 0usize;
    loop {
        let position = reader.buffer_position();
        let event = reader.read_event().map_err(|e| CodecError::Xml {
            position,
            reason: e.to_string(),
        })?;
        match event {
            Event::Decl(_) if stack.is_empty() && root.is_none() && count == 0 => {}
            Event::Decl(_) | Event::PI(_) => {
                return Err(CodecError::Forbidden("a processing instruction"));
            }
            Event::DocType(_) => return Err(CodecError::Forbidden("a DOCTYPE")),
            Event::CData(_) => return Err(CodecError::Forbidden("CDATA")),
            Event::Comment(_) => return Err(CodecError::Forbidden("a comment")),
            Event::Start(start) | Event::Empty(start) if root.is_some() => {
                let name = start.name().as_ref().to_string();
                return Err(CodecError::Xml {
                    position,
                    reason: format!("content <{name}> after the document element"),
                });
            }
            Event::Start(start) => {
                count += 1;
                if count > MAX_ELEMENTS {
                    return Err(CodecError::TooManyElements);
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(CodecError::TooDeep);
                }
                stack.push(element_from(&start, position)?);
            }
            Event::Empty(start) => {
                count += 1;
                if count > MAX_ELEMENTS {
                    return Err(CodecError::TooManyElements);
                }
                let element = element_from(&start, position)?;
                attach(&mut stack, &mut root, element)?;
            }
            Event::End(_) => {
                // quick-xml checks that end tags match their start tags.
                let element = stack.pop().ok_or(CodecError::Xml {
                    position,
                    reason: "unmatched end tag".into(),
                })?;
                attach(&mut stack, &mut root, element)?;
            }
            Event::Text(text) => {
                let content = text.xml10_content();
                match stack.last_mut() {
                    Some(top) => top.text.push_str(&content),
                    None if content.trim().is_empty() => {}
                    None => {
                        return Err(CodecError::Xml {
                            position,
                            reason: "text outside the document element".into(),
                        });
                    }
                }
            }
            Event::GeneralRef(reference) => {
                let resolved = match reference.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => {
                        let name = reference.xml10_content();
                        quick_xml::escape::resolve_predefined_entity(&name)
                            .map(str::to_string)
                            .ok_or(CodecError::Forbidden(
                                "an entity other than the five predefined ones",
                            ))?
                    }
                    Err(e) => {
                        return Err(CodecError::Xml {
                            position,
                            reason: e.to_string(),
                        });
                    }
                };
                match stack.last_mut() {
                    Some(top) => top.text.push_str(&resolved),
                    None => {
                        return Err(CodecError::Forbidden(
                            "a reference outside the document element",
                        ));
                    }
                }
            }
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(CodecError::Xml {
            position: reader.buffer_position(),
            reason: format!(
                "<{}> is not closed",
                stack.last().map(|e| e.name.as_str()).unwrap_or("")
            ),
        });
    }
    root.ok_or(CodecError::Xml {
        position: 0,
        reason: "no document element".into(),
    })
}

fn element_from(
    start: &quick_xml::events::BytesStart<'_>,
    position: u64,
) -> Result<Element, CodecError> {
    let name = start.name().as_ref().to_string();
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(CodecError::Xml {
            position,
            reason: format!("element name of {} bytes", name.len()),
        });
    }
    if start.attributes().next().is_some() {
        return Err(CodecError::Attribute(name));
    }
    Ok(Element {
        name,
        ..Element::default()
    })
}

fn attach(
    stack: &mut [Element],
    root: &mut Option<Element>,
    element: Element,
) -> Result<(), CodecError> {
    match stack.last_mut() {
        Some(parent) => {
            // Lists repeat their item element (<Txn>); leaf fields must not repeat.
            if element.children.is_empty()
                && parent
                    .children
                    .iter()
                    .any(|c| c.name == element.name && c.children.is_empty())
                && !is_list_item(&element.name)
            {
                return Err(CodecError::Duplicate(element.name, parent.name.clone()));
            }
            parent.children.push(element);
        }
        None => *root = Some(element),
    }
    Ok(())
}

fn is_list_item(name: &str) -> bool {
    name == "Txn"
}

/// Builds a message byte-exactly; the caller signs `bytes()` and appends the signature.
#[derive(Debug, Default)]
pub struct MessageWriter {
    out: String,
}

impl MessageWriter {
    pub fn new() -> MessageWriter {
        let mut out = String::with_capacity(1024);
        out.push_str("<root><MsgHeader>");
        MessageWriter { out }
    }

    /// Writes `<name>value</name>`, escaping the value.
    pub fn field(&mut self, name: &str, value: &str) -> &mut Self {
        debug_assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric()),
            "element names are ASCII words"
        );
        let _ = write!(
            self.out,
            "<{name}>{}</{name}>",
            quick_xml::escape::escape(value)
        );
        self
    }

    /// Appends already-escaped XML (a list rendered by the caller).
    pub fn raw(&mut self, xml: &str) -> &mut Self {
        self.out.push_str(xml);
        self
    }

    pub fn open(&mut self, name: &str) -> &mut Self {
        let _ = write!(self.out, "<{name}>");
        self
    }

    pub fn close(&mut self, name: &str) -> &mut Self {
        let _ = write!(self.out, "</{name}>");
        self
    }

    /// Ends the header and opens the body.
    pub fn body(&mut self) -> &mut Self {
        self.out.push_str("</MsgHeader><MsgBody>");
        self
    }

    /// Ends the body and the document; returns the bytes to sign.
    pub fn finish(mut self) -> String {
        self.out.push_str("</MsgBody></root>");
        self.out
    }
}

/// Appends `{S:base64}` to signed bytes.
pub fn attach_signature(mut signed: Vec<u8>, signature: &[u8]) -> Vec<u8> {
    signed.extend_from_slice(SIGNATURE_OPEN);
    signed.extend_from_slice(BASE64.encode(signature).as_bytes());
    signed.push(b'}');
    signed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = MessageWriter::new();
        w.field("MsgTp", "DEBIT")
            .field("SndInstId", "TENPAY")
            .body();
        w.field("ReqSerial", "R1")
            .field("Amt", "100")
            .field("Memo", "a<b & \"c\"");
        attach_signature(w.finish().into_bytes(), &[1, 2, 3])
    }

    #[test]
    fn round_trip_keeps_signed_bytes_exact() {
        let raw = sample();
        let message = parse(&raw).unwrap();
        assert_eq!(message.signature, vec![1, 2, 3]);
        assert!(message.signed.ends_with(b"</MsgBody></root>"));
        assert_eq!(message.header.text_of("MsgTp"), Some("DEBIT"));
        assert_eq!(message.body.text_of("Memo"), Some("a<b & \"c\""));
    }

    #[test]
    fn hostile_and_malformed_input_is_rejected_precisely() {
        let sig = "{S:AQID}";
        let cases: &[(&str, &str)] = &[
            ("<root><MsgHeader/><MsgBody/></root>", "no signature"),
            ("<root><MsgHeader/><MsgBody/></root>{S:%%%}", "not base64"),
            (
                r#"<!DOCTYPE root [<!ENTITY x "y">]><root><MsgHeader/><MsgBody/></root>"#,
                "DOCTYPE",
            ),
            ("<root><MsgHeader/><MsgBody>&x;</MsgBody></root>", "entity"),
            (
                "<root><MsgHeader/><MsgBody><![CDATA[x]]></MsgBody></root>",
                "CDATA",
            ),
            (
                "<root><MsgHeader/><MsgBody><A>1</A><A>2</A></MsgBody></root>",
                "appears twice",
            ),
            (r#"<root><MsgHeader a="1"/><MsgBody/></root>"#, "attributes"),
            ("<root><MsgBody/><MsgHeader/></root>", "must hold"),
            ("<other><MsgHeader/><MsgBody/></other>", "must be <root>"),
            (
                "<root><MsgHeader/><MsgBody><A><B><C><D><E>x</E></D></C></B></A></MsgBody></root>",
                "deeper",
            ),
            ("<root><MsgHeader/><MsgBody></root>", "well-formed"),
        ];
        for (xml, expected) in cases {
            let raw = if expected == &"no signature" || expected == &"not base64" {
                xml.to_string()
            } else {
                format!("{xml}{sig}")
            };
            let error = parse(raw.as_bytes()).unwrap_err().to_string();
            assert!(
                error.contains(expected),
                "{xml}: expected {expected:?}, got {error:?}"
            );
        }
    }

    #[test]
    fn the_last_signature_suffix_is_the_signature() {
        // A body value may contain "{S:" itself; only the final suffix counts.
        let mut w = MessageWriter::new();
        w.field("MsgTp", "DEBIT").body();
        w.field("Memo", "{S:fake}");
        let raw = attach_signature(w.finish().into_bytes(), b"sig");
        let message = parse(&raw).unwrap();
        assert_eq!(message.signature, b"sig");
        assert_eq!(message.body.text_of("Memo"), Some("{S:fake}"));
    }
}
