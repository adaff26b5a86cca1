//! The protobuf wire form of the route model, and conversions both ways.
//!
//! Converting from the wire validates every field through the model's constructors: a peer
//! cannot hand us a route the model would refuse.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("isthmus.routesync.v1");

use crate::error::InvalidRoute;
use crate::model;

impl From<model::Protocol> for Protocol {
    fn from(p: model::Protocol) -> Self {
        match p {
            model::Protocol::Tcp => Protocol::Tcp,
            model::Protocol::Http => Protocol::Http,
            model::Protocol::Tls => Protocol::Tls,
        }
    }
}

/// The wire form of a peer selector, as its `Display` writes it.
fn selector(peer: &model::PeerSelector) -> String {
    match peer {
        model::PeerSelector::Cluster(c) => ["cluster:", c.as_str()].concat(),
        model::PeerSelector::Identity(id) => id.as_str().to_owned(),
    }
}

impl Route {
    /// The wire form of `route`; `with_backends` false strips the local backends (what a peer
    /// cluster gets).
    pub fn from_model(route: &model::Route, with_backends: bool) -> Self {
        // Copies of the names rather than `to_string()`: a snapshot converts 250,000 routes,
        // and the formatting machinery was most of the cost.
        Route {
            name: route.key.name.as_str().to_owned(),
            port: u32::from(route.key.port),
            protocol: Protocol::from(route.protocol) as i32,
            home_cluster: route.home_cluster.as_str().to_owned(),
            exported: route.exported,
            allowed_peers: route.allowed_peers.iter().map(selector).collect(),
            backends: if with_backends {
                route.backends.iter().map(ToString::to_string).collect()
            } else {
                Vec::new()
            },
            weights: route
                .weights
                .iter()
                .map(|(c, w)| (c.as_str().to_owned(), *w))
                .collect(),
            vip: match (with_backends, route.vip) {
                (true, Some(ip)) => ip.to_string(),
                _ => String::new(),
            },
            egress_port: match (with_backends, route.egress_port) {
                (true, Some(port)) => u32::from(port),
                _ => 0,
            },
            revision: route.revision,
        }
    }

    /// The model form, validated.
    ///
    /// # Errors
    /// The first field that the model refuses.
    pub fn to_model(&self) -> Result<model::Route, InvalidRoute> {
        self.to_model_with(&mut Names::default())
    }

    /// As [`Route::to_model`], taking the cluster names and peer selectors it repeats from
    /// `names`: the routes of one stream share them instead of each holding its own copy.
    pub(crate) fn to_model_with(&self, names: &mut Names) -> Result<model::Route, InvalidRoute> {
        let port = u16::try_from(self.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(InvalidRoute::Port {
                value: i64::from(self.port),
            })?;
        let protocol = match Protocol::try_from(self.protocol) {
            Ok(Protocol::Tcp) => model::Protocol::Tcp,
            Ok(Protocol::Http) => model::Protocol::Http,
            Ok(Protocol::Tls) => model::Protocol::Tls,
            Err(_) => {
                return Err(InvalidRoute::Protocol {
                    value: self.protocol.to_string(),
                });
            }
        };
        Ok(model::Route {
            key: model::RouteKey::new(model::RouteName::parse(&self.name)?, port),
            protocol,
            home_cluster: names.cluster(&self.home_cluster)?,
            exported: self.exported,
            allowed_peers: model::parse_list(&self.allowed_peers, |p| names.peer(p))?,
            backends: model::parse_list(&self.backends, model::Backend::parse)?,
            weights: self
                .weights
                .iter()
                .map(|(c, w)| Ok((names.cluster(c)?, *w)))
                .collect::<Result<_, InvalidRoute>>()?,
            vip: if self.vip.is_empty() {
                None
            } else {
                Some(self.vip.parse().map_err(|_| InvalidRoute::Vip {
                    value: self.vip.clone(),
                })?)
            },
            egress_port: match self.egress_port {
                0 => None,
                p => Some(u16::try_from(p).map_err(|_| InvalidRoute::Port {
                    value: i64::from(p),
                })?),
            },
            revision: self.revision,
        })
    }
}

/// The cluster names and peer selectors already decoded on one stream, handed out again
/// (an `Arc` clone) when they repeat, as they do in every route of a peer. Bounded: past a
/// few dozen distinct values, new ones are parsed and not kept.
#[derive(Debug, Default)]
pub(crate) struct Names {
    clusters: Vec<model::ClusterName>,
    peers: Vec<(String, model::PeerSelector)>,
}

impl Names {
    const LIMIT: usize = 64;

    fn cluster(&mut self, name: &str) -> Result<model::ClusterName, InvalidRoute> {
        if let Some(known) = self.clusters.iter().find(|c| c.as_str() == name) {
            return Ok(known.clone());
        }
        let parsed = model::ClusterName::parse(name)?;
        if self.clusters.len() < Self::LIMIT {
            self.clusters.push(parsed.clone());
        }
        Ok(parsed)
    }

    fn peer(&mut self, selector: &str) -> Result<model::PeerSelector, InvalidRoute> {
        if let Some((_, known)) = self.peers.iter().find(|(s, _)| s == selector) {
            return Ok(known.clone());
        }
        let parsed = match selector.strip_prefix("cluster:") {
            Some(cluster) => model::PeerSelector::Cluster(self.cluster(cluster)?),
            None => model::PeerSelector::parse(selector)?,
        };
        if self.peers.len() < Self::LIMIT {
            self.peers.push((selector.to_string(), parsed.clone()));
        }
        Ok(parsed)
    }
}

impl RouteKey {
    /// The wire form of a key.
    pub fn from_model(key: &model::RouteKey) -> Self {
        RouteKey {
            name: key.name.as_str().to_owned(),
            port: u32::from(key.port),
        }
    }

    /// The model form, validated.
    ///
    /// # Errors
    /// When the name or port is invalid.
    pub fn to_model(&self) -> Result<model::RouteKey, InvalidRoute> {
        let port = u16::try_from(self.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(InvalidRoute::Port {
                value: i64::from(self.port),
            })?;
        Ok(model::RouteKey::new(
            model::RouteName::parse(&self.name)?,
            port,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(name: &str) -> Route {
        Route {
            name: name.into(),
            port: 8080,
            protocol: Protocol::Http as i32,
            home_cluster: "diego".into(),
            exported: true,
            allowed_peers: vec!["cluster:k8s".into()],
            backends: vec!["10.0.0.1:8080".into()],
            weights: [("diego".to_string(), 1)].into(),
            vip: "100.64.0.7".into(),
            egress_port: 20001,
            revision: 3,
        }
    }

    #[test]
    fn routes_decoded_together_share_their_names_and_waste_no_room() {
        let mut names = Names::default();
        let a = wire("a.apps.internal").to_model_with(&mut names).unwrap();
        let b = wire("b.apps.internal").to_model_with(&mut names).unwrap();
        let same = |x: &str, y: &str| std::ptr::eq(x.as_ptr(), y.as_ptr());
        assert!(same(a.home_cluster.as_str(), b.home_cluster.as_str()));
        let model::PeerSelector::Cluster(pa) = &a.allowed_peers[0] else {
            panic!("{:?}", a.allowed_peers)
        };
        let model::PeerSelector::Cluster(pb) = &b.allowed_peers[0] else {
            panic!("{:?}", b.allowed_peers)
        };
        assert!(same(pa.as_str(), pb.as_str()));
        assert_eq!(a.allowed_peers.capacity(), 1);
        assert_eq!(a.backends.capacity(), 1);
        // Decoded alone or together, the route is the same, and encodes back the same.
        assert_eq!(a, wire("a.apps.internal").to_model().unwrap());
        assert_eq!(Route::from_model(&a, true), wire("a.apps.internal"));
        let mut bad = wire("c.apps.internal");
        bad.allowed_peers = vec!["cluster:-no".into()];
        assert!(bad.to_model_with(&mut names).is_err());
    }
}
