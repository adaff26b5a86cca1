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

impl Route {
    /// The wire form of `route`; `with_backends` false strips the local backends (what a peer
    /// cluster gets).
    pub fn from_model(route: &model::Route, with_backends: bool) -> Self {
        Route {
            name: route.key.name.to_string(),
            port: u32::from(route.key.port),
            protocol: Protocol::from(route.protocol) as i32,
            home_cluster: route.home_cluster.to_string(),
            exported: route.exported,
            allowed_peers: route
                .allowed_peers
                .iter()
                .map(ToString::to_string)
                .collect(),
            backends: if with_backends {
                route.backends.iter().map(ToString::to_string).collect()
            } else {
                Vec::new()
            },
            weights: route
                .weights
                .iter()
                .map(|(c, w)| (c.to_string(), *w))
                .collect(),
            revision: route.revision,
        }
    }

    /// The model form, validated.
    ///
    /// # Errors
    /// The first field that the model refuses.
    pub fn to_model(&self) -> Result<model::Route, InvalidRoute> {
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
            home_cluster: model::ClusterName::parse(&self.home_cluster)?,
            exported: self.exported,
            allowed_peers: self
                .allowed_peers
                .iter()
                .map(|p| model::PeerSelector::parse(p))
                .collect::<Result<_, _>>()?,
            backends: self
                .backends
                .iter()
                .map(|b| model::Backend::parse(b))
                .collect::<Result<_, _>>()?,
            weights: self
                .weights
                .iter()
                .map(|(c, w)| Ok((model::ClusterName::parse(c)?, *w)))
                .collect::<Result<_, InvalidRoute>>()?,
            revision: self.revision,
        })
    }
}

impl RouteKey {
    /// The wire form of a key.
    pub fn from_model(key: &model::RouteKey) -> Self {
        RouteKey {
            name: key.name.to_string(),
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
