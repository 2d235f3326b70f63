//! URL groups ("topics" on the wire): a named set of endpoints a publish fans out to.
//!
//! A group is one record on the compacted URL-groups topic (key: the group name; schema
//! `schemas/url_group.v1.json`), holding every endpoint. Publishing to a group creates one message
//! per endpoint, each with its own id, retries, DLQ entry and signature (`sub` = the endpoint's
//! URL); the API writes them all in one Kafka transaction. Endpoints are identified by their URL;
//! an optional name lets a caller remove an endpoint by name. Adding an endpoint whose URL or name
//! is already in the group replaces that endpoint; removing the last endpoint deletes the group.

use serde::{Deserialize, Serialize};

use super::destination::validate_url;

/// Schema version of [`UrlGroupRecord`].
pub const URL_GROUP_VERSION: u32 = 1;

/// One endpoint of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Endpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub url: String,
}

/// A URL group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UrlGroupRecord {
    pub v: u32,
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub created_at: i64,
    pub updated_at: i64,
}

crate::json_record!(UrlGroupRecord, "url_group", URL_GROUP_VERSION, key = name);

/// A reference to an endpoint to remove: by URL, by name, or both must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
pub struct EndpointRef {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
}

impl EndpointRef {
    fn matches(&self, e: &Endpoint) -> bool {
        let by_url = self.url.as_ref().is_none_or(|u| *u == e.url);
        let by_name = self
            .name
            .as_ref()
            .is_none_or(|n| e.name.as_ref() == Some(n));
        (self.url.is_some() || self.name.is_some()) && by_url && by_name
    }
}

impl UrlGroupRecord {
    /// An empty group.
    pub fn new(name: &str, now_ms: i64) -> Self {
        UrlGroupRecord {
            v: URL_GROUP_VERSION,
            name: name.to_string(),
            endpoints: Vec::new(),
            created_at: now_ms,
            updated_at: now_ms,
        }
    }

    /// Adds (or replaces, by URL or name) `endpoints`, checking each URL.
    pub fn add(&mut self, endpoints: Vec<Endpoint>, now_ms: i64) -> Result<(), String> {
        for e in &endpoints {
            validate_url(&e.url).map_err(|err| format!("endpoint {:?}: {err}", e.url))?;
            if let Some(name) = &e.name {
                if name.is_empty() {
                    return Err("an endpoint name must not be empty".into());
                }
            }
        }
        for e in endpoints {
            self.endpoints.retain(|old| {
                old.url != e.url && (e.name.is_none() || old.name.as_ref() != e.name.as_ref())
            });
            self.endpoints.push(e);
        }
        self.updated_at = now_ms.max(self.updated_at + 1);
        Ok(())
    }

    /// Removes the endpoints `refs` name; how many went.
    pub fn remove(&mut self, refs: &[EndpointRef], now_ms: i64) -> usize {
        let before = self.endpoints.len();
        self.endpoints
            .retain(|e| !refs.iter().any(|r| r.matches(e)));
        self.updated_at = now_ms.max(self.updated_at + 1);
        before - self.endpoints.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(name: Option<&str>, url: &str) -> Endpoint {
        Endpoint {
            name: name.map(String::from),
            url: url.into(),
        }
    }

    #[test]
    fn endpoints_are_added_replaced_and_removed() {
        let mut g = UrlGroupRecord::new("g", 1);
        g.add(
            vec![ep(Some("a"), "https://a.com"), ep(None, "https://b.com")],
            2,
        )
        .unwrap();
        g.add(vec![ep(Some("a"), "https://a2.com")], 3).unwrap();
        assert_eq!(
            g.endpoints,
            vec![ep(None, "https://b.com"), ep(Some("a"), "https://a2.com")],
            "the same name replaces"
        );
        assert!(g.add(vec![ep(None, "not a url")], 4).is_err());
        let by_name = EndpointRef {
            name: Some("a".into()),
            url: None,
        };
        assert_eq!(g.remove(&[by_name], 5), 1);
        let by_url = EndpointRef {
            name: None,
            url: Some("https://b.com".into()),
        };
        assert_eq!(g.remove(&[by_url, EndpointRef::default()], 6), 1);
        assert!(g.endpoints.is_empty());
        assert!(g.updated_at >= 6);
    }

    #[test]
    fn record_round_trips_and_matches_the_published_schema() {
        let mut g = UrlGroupRecord::new("g", 1);
        g.add(
            vec![ep(Some("a"), "https://a.com"), ep(None, "https://b.com")],
            2,
        )
        .unwrap();
        crate::model::schema_test::assert_round_trip(&g, "url_group.v1.json");
    }
}
