//! Rich tool results: text, images, audio, links to resources and embedded
//! resources, as content blocks.
//!
//! A tool whose `Output` is [`Content`] returns blocks instead of one JSON value.
//! It travels through the one pipeline as JSON like any result, in one form that
//! nothing else has: an object whose only key is `"$content"`, holding the blocks in
//! MCP's own shapes.
//!
//! ```
//! use tool_dispatch::content::{Content, ResourceLink};
//! let png = [0x89, b'P', b'N', b'G'];
//! let out = Content::new()
//!     .text("Here is the chart.")
//!     .image(&png, "image/png")
//!     .link(ResourceLink::new("file:///reports/q3.csv", "q3.csv").mime_type("text/csv"));
//! let json = serde_json::to_value(&out)?;
//! assert_eq!(json["$content"][1], serde_json::json!({
//!     "type": "image", "data": "iVBORw==", "mimeType": "image/png"}));
//! assert_eq!(Content::from_json(&json), Some(out));
//! # Ok::<(), serde_json::Error>(())
//! ```
//!
//! Where it goes:
//!
//! | to | as |
//! |---|---|
//! | MCP (`tools/call`) | the blocks, as they are |
//! | Anthropic `tool_result` | text blocks; images (JPEG, PNG, GIF, WebP) as base64 image blocks; PDFs as documents; the rest described in text |
//! | OpenAI Responses `function_call_output` | `input_text`; images as `input_image` data URLs; PDFs as `input_file`; the rest described |
//! | OpenAI Chat `role: tool` | text only: the texts, each other block described (`[image/png, 4 bytes]`), links as their URI |
//! | events (`tool_completed`), run logs | the blocks, each image, audio or blob replaced by a marker (`[image/png, 123,456 bytes]`); the caller's value is never altered |

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The key that marks a result as content blocks.
pub const CONTENT_KEY: &str = "$content";

/// A tool result made of content blocks. See the [module docs](self).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Content {
    #[serde(rename = "$content")]
    blocks: Vec<Block>,
}

/// One content block, in MCP's shape (`type`-tagged, camelCase fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
#[non_exhaustive]
pub enum Block {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image.
    Image {
        /// The image's bytes, base64-encoded.
        data: String,
        /// Its media type (`image/png`).
        mime_type: String,
    },
    /// Audio.
    Audio {
        /// The audio's bytes, base64-encoded.
        data: String,
        /// Its media type (`audio/wav`).
        mime_type: String,
    },
    /// A link to a resource the client may fetch.
    ResourceLink(ResourceLink),
    /// A resource's contents, embedded.
    Resource {
        /// The resource.
        resource: Embedded,
    },
}

/// A link to a resource: its URI and name, and what else is known of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct ResourceLink {
    /// The resource's URI.
    pub uri: String,
    /// Its name.
    pub name: String,
    /// A title for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// What it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Its media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    /// Its size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl ResourceLink {
    /// A link to `uri`, called `name`.
    pub fn new(uri: impl Into<String>, name: impl Into<String>) -> ResourceLink {
        ResourceLink {
            uri: uri.into(),
            name: name.into(),
            title: None,
            description: None,
            mime_type: None,
            size: None,
        }
    }

    /// With a title.
    pub fn title(mut self, title: impl Into<String>) -> ResourceLink {
        self.title = Some(title.into());
        self
    }

    /// With a description.
    pub fn description(mut self, description: impl Into<String>) -> ResourceLink {
        self.description = Some(description.into());
        self
    }

    /// With a media type.
    pub fn mime_type(mut self, mime_type: impl Into<String>) -> ResourceLink {
        self.mime_type = Some(mime_type.into());
        self
    }

    /// With a size in bytes.
    pub fn size(mut self, bytes: u64) -> ResourceLink {
        self.size = Some(bytes);
        self
    }
}

/// An embedded resource: its URI, media type, and text or (base64) bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Embedded {
    /// The resource's URI.
    pub uri: String,
    /// Its media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    /// Its contents as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Its contents as bytes, base64-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
}

impl Content {
    /// No blocks yet.
    pub fn new() -> Content {
        Content::default()
    }

    /// The blocks, in order.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Adds a block.
    pub fn block(mut self, block: Block) -> Content {
        self.blocks.push(block);
        self
    }

    /// Adds text.
    pub fn text(self, text: impl Into<String>) -> Content {
        self.block(Block::Text { text: text.into() })
    }

    /// Adds an image from its bytes.
    pub fn image(self, bytes: &[u8], mime_type: impl Into<String>) -> Content {
        self.block(Block::Image {
            data: STANDARD.encode(bytes),
            mime_type: mime_type.into(),
        })
    }

    /// Adds audio from its bytes.
    pub fn audio(self, bytes: &[u8], mime_type: impl Into<String>) -> Content {
        self.block(Block::Audio {
            data: STANDARD.encode(bytes),
            mime_type: mime_type.into(),
        })
    }

    /// Adds a link to a resource.
    pub fn link(self, link: ResourceLink) -> Content {
        self.block(Block::ResourceLink(link))
    }

    /// Embeds a text resource.
    pub fn resource_text(
        self,
        uri: impl Into<String>,
        mime_type: impl Into<String>,
        text: impl Into<String>,
    ) -> Content {
        self.block(Block::Resource {
            resource: Embedded {
                uri: uri.into(),
                mime_type: Some(mime_type.into()),
                text: Some(text.into()),
                blob: None,
            },
        })
    }

    /// Embeds a binary resource from its bytes.
    pub fn resource_bytes(
        self,
        uri: impl Into<String>,
        mime_type: impl Into<String>,
        bytes: &[u8],
    ) -> Content {
        self.block(Block::Resource {
            resource: Embedded {
                uri: uri.into(),
                mime_type: Some(mime_type.into()),
                text: None,
                blob: Some(STANDARD.encode(bytes)),
            },
        })
    }

    /// Reads a result in content form (`{"$content": [..]}`); `None` for any other
    /// value, including one that has the key but blocks that do not fit.
    pub fn from_json(value: &Value) -> Option<Content> {
        if !is_content(value) {
            return None;
        }
        Content::deserialize(value).ok()
    }
}

/// Whether `value` has the content form's shape: one key, `"$content"`, an array.
fn is_content(value: &Value) -> bool {
    value
        .as_object()
        .is_some_and(|o| o.len() == 1 && o.get(CONTENT_KEY).is_some_and(Value::is_array))
}

impl Block {
    /// A short description of a block for text-only readers (`[image/png, 4 bytes]`,
    /// a link's URI, a text resource's text).
    pub fn describe(&self) -> String {
        match self {
            Block::Text { text } => text.clone(),
            Block::Image { data, mime_type } | Block::Audio { data, mime_type } => {
                marker(mime_type, data)
            }
            Block::ResourceLink(l) => {
                let mut s = format!("[{}]({})", l.title.as_deref().unwrap_or(&l.name), l.uri);
                if let Some(d) = &l.description {
                    s.push_str(": ");
                    s.push_str(d);
                }
                s
            }
            Block::Resource { resource: r } => match (&r.text, &r.blob) {
                (Some(text), _) => format!("{}:\n{text}", r.uri),
                (None, Some(blob)) => format!(
                    "{} {}",
                    r.uri,
                    marker(
                        r.mime_type.as_deref().unwrap_or("application/octet-stream"),
                        blob
                    )
                ),
                (None, None) => r.uri.clone(),
            },
        }
    }
}

/// How many bytes base64 `data` stands for.
pub(crate) fn decoded_len(data: &str) -> usize {
    let pad = data.bytes().rev().take_while(|b| *b == b'=').count().min(2);
    (data.len() / 4 * 3 + (data.len() % 4).saturating_sub(1)).saturating_sub(pad)
}

/// `[image/png, 123,456 bytes]`.
fn marker(mime_type: &str, data: &str) -> String {
    let n = decoded_len(data).to_string();
    let mut grouped = String::with_capacity(n.len() + n.len() / 3);
    for (i, c) in n.chars().enumerate() {
        if i > 0 && (n.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let mime: String = mime_type.chars().take(100).collect();
    format!("[{mime}, {grouped} bytes]")
}

/// In an event's copy of a result: each image's, audio's and blob's base64 data
/// replaced by a marker (`[image/png, 123,456 bytes]`). Any other value is left
/// as it is.
pub(crate) fn elide_binary(value: &mut Value) {
    if !is_content(value) {
        return;
    }
    let Some(Value::Array(blocks)) = value.get_mut(CONTENT_KEY) else {
        return;
    };
    for block in blocks.iter_mut().filter_map(Value::as_object_mut) {
        let kind = block
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let (holder, key) = match kind {
            "image" | "audio" => (Some(block), "data"),
            "resource" => (
                block.get_mut("resource").and_then(Value::as_object_mut),
                "blob",
            ),
            _ => (None, ""),
        };
        let Some(holder) = holder else { continue };
        let mime = holder
            .get("mimeType")
            .and_then(Value::as_str)
            .unwrap_or("application/octet-stream")
            .to_owned();
        if let Some(Value::String(data)) = holder.get_mut(key) {
            *data = marker(&mime, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decoded_length_counts_padding() {
        for n in 0..40usize {
            let data = STANDARD.encode(vec![7u8; n]);
            assert_eq!(decoded_len(&data), n, "{data}");
        }
    }

    #[test]
    fn binary_becomes_a_marker_in_the_events_copy_only() {
        let bytes = vec![0u8; 123_456];
        let out = Content::new()
            .text("t")
            .image(&bytes, "image/png")
            .audio(&[1, 2, 3], "audio/wav")
            .resource_bytes("file:///a.pdf", "application/pdf", &[9; 1000])
            .resource_text("file:///a.txt", "text/plain", "hello");
        let mut event = serde_json::to_value(&out).unwrap();
        elide_binary(&mut event);
        assert_eq!(event[CONTENT_KEY][1]["data"], "[image/png, 123,456 bytes]");
        assert_eq!(event[CONTENT_KEY][2]["data"], "[audio/wav, 3 bytes]");
        assert_eq!(
            event[CONTENT_KEY][3]["resource"]["blob"],
            "[application/pdf, 1,000 bytes]"
        );
        assert_eq!(event[CONTENT_KEY][4]["resource"]["text"], "hello");
        assert!(event.to_string().len() < 1024);
    }

    #[test]
    fn only_the_exact_form_is_content() {
        let lookalikes = [
            json!({"$content": [], "other": 1}),
            json!({"$content": "text"}),
            json!({"content": [{"type": "text", "text": "x"}]}),
            json!({"$content": [{"type": "video", "data": "x"}]}),
            json!([{"$content": []}]),
        ];
        for v in lookalikes {
            assert_eq!(Content::from_json(&v), None, "{v}");
            let mut copy = v.clone();
            elide_binary(&mut copy);
            assert_eq!(copy, v);
        }
        assert_eq!(
            Content::from_json(&json!({"$content": []})),
            Some(Content::new())
        );
    }
}
