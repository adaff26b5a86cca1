//! What the real API server's Service REST storage adds: defaults, a ClusterIP from the
//! service CIDR, and NodePorts from 30000-32767, kept across replaces and freed on delete.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde_json::{Value, json};

use super::status::ApiError;

/// The NodePort range of a default kube-apiserver (`--service-node-port-range`).
pub const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

/// Parses an IPv4 CIDR (`10.96.0.0/16`).
///
/// # Errors
/// A message naming the input and the expected form.
pub fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || {
        format!(
            "service CIDR {cidr:?}: expected an IPv4 CIDR such as 10.96.0.0/16 with a prefix of /8 to /30"
        )
    };
    let (ip, len) = cidr.split_once('/').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if !(8..=30).contains(&len) {
        return Err(bad());
    }
    let mask = u32::MAX << (32 - len);
    Ok((Ipv4Addr::from(u32::from(ip) & mask), len))
}

/// The ClusterIP and NodePort allocations.
#[derive(Debug)]
pub struct Allocator {
    base: u32,
    size: u32,
    ips: BTreeSet<u32>,
    node_ports: BTreeSet<u16>,
}

fn is_node_port_type(spec: &Value) -> bool {
    matches!(
        spec.get("type").and_then(Value::as_str),
        Some("NodePort" | "LoadBalancer")
    )
}

impl Allocator {
    /// An allocator over `base/len`.
    pub fn new(base: Ipv4Addr, len: u8) -> Allocator {
        Allocator {
            base: u32::from(base),
            size: 1u32 << (32 - len),
            ips: BTreeSet::new(),
            node_ports: BTreeSet::new(),
        }
    }

    fn in_range(&self, ip: u32) -> bool {
        // The network and broadcast addresses are never handed out.
        ip > self.base && ip < self.base + self.size - 1
    }

    fn allocate_ip(&mut self, name: &str) -> Result<u32, ApiError> {
        let free = (self.base + 1..self.base + self.size - 1).find(|ip| !self.ips.contains(ip));
        let ip = free.ok_or_else(|| {
            ApiError::invalid(
                "services",
                name,
                format!("Service \"{name}\" is invalid: spec.clusterIPs: Internal error: failed to allocate a serviceIP: range is full"),
            )
        })?;
        self.ips.insert(ip);
        Ok(ip)
    }

    fn allocate_node_port(&mut self, name: &str) -> Result<u16, ApiError> {
        let port = NODE_PORTS
            .clone()
            .find(|p| !self.node_ports.contains(p))
            .ok_or_else(|| {
                ApiError::invalid(
                    "services",
                    name,
                    format!("Service \"{name}\" is invalid: spec.ports: Internal error: failed to allocate a nodePort: range is full"),
                )
            })?;
        self.node_ports.insert(port);
        Ok(port)
    }

    /// Frees what a deleted Service held.
    pub fn release(&mut self, service: &Value) {
        if let Some(ip) = cluster_ip(service) {
            self.ips.remove(&ip);
        }
        for port in node_ports(service) {
            self.node_ports.remove(&port);
        }
    }

    /// Defaults and allocates for a Service being created (`old` = None) or replaced. On
    /// error nothing stays allocated.
    ///
    /// # Errors
    /// 422 Invalid naming the field and what was expected.
    pub fn admit(
        &mut self,
        name: &str,
        new: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        let invalid = |field: &str, what: String| {
            ApiError::invalid(
                "services",
                name,
                format!("Service \"{name}\" is invalid: {field}: {what}"),
            )
        };
        if new.get("spec").is_none() {
            new["spec"] = json!({});
        }
        let Some(spec) = new.get_mut("spec").and_then(Value::as_object_mut) else {
            return Err(invalid("spec", "expected an object".into()));
        };
        let ty = spec
            .entry("type")
            .or_insert_with(|| Value::String("ClusterIP".into()))
            .as_str()
            .unwrap_or("")
            .to_owned();
        if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&ty.as_str()) {
            return Err(invalid(
                "spec.type",
                format!(
                    "Unsupported value: {ty:?}: supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""
                ),
            ));
        }
        spec.entry("sessionAffinity")
            .or_insert_with(|| "None".into());
        let ports = spec.entry("ports").or_insert_with(|| json!([]));
        let Some(ports) = ports.as_array_mut() else {
            return Err(invalid("spec.ports", "expected a list".into()));
        };
        for (i, port) in ports.iter_mut().enumerate() {
            let Some(p) = port.as_object_mut() else {
                return Err(invalid(
                    &format!("spec.ports[{i}]"),
                    "expected an object".into(),
                ));
            };
            let number = p.get("port").and_then(Value::as_u64).unwrap_or(0);
            if !(1..=65535).contains(&number) {
                return Err(invalid(
                    &format!("spec.ports[{i}].port"),
                    format!(
                        "Invalid value: {}: must be between 1 and 65535, inclusive",
                        p.get("port").unwrap_or(&Value::Null)
                    ),
                ));
            }
            p.entry("protocol").or_insert_with(|| "TCP".into());
            p.entry("targetPort").or_insert_with(|| Value::from(number));
        }

        // ClusterIP: kept from the old object when the new one leaves it out; immutable.
        let old_ip = old
            .and_then(|o| o.pointer("/spec/clusterIP"))
            .and_then(Value::as_str);
        let wanted = spec
            .get("clusterIP")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let wanted = match (wanted, old_ip) {
            (Some(w), Some(o)) if w != o => {
                return Err(invalid(
                    "spec.clusterIPs[0]",
                    format!("Invalid value: []string{{{w:?}}}: may not change once set"),
                ));
            }
            (w, o) => w.or(o).map(str::to_owned),
        };
        let mut allocated_ip = None;
        if ty == "ExternalName" {
            spec.remove("clusterIP");
            spec.remove("clusterIPs");
        } else {
            let ip = match wanted.as_deref() {
                Some("None") => "None".to_owned(),
                Some(ip) if old_ip == Some(ip) => ip.to_owned(),
                Some(ip) => {
                    let parsed: Ipv4Addr = ip.parse().map_err(|_| {
                        invalid("spec.clusterIPs[0]", format!("Invalid value: {ip:?}: must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff) or \"None\""))
                    })?;
                    let n = u32::from(parsed);
                    if !self.in_range(n) {
                        return Err(invalid(
                            "spec.clusterIPs",
                            format!(
                                "Invalid value: []string{{{ip:?}}}: failed to allocate IP {ip}: provided IP is not in the valid range"
                            ),
                        ));
                    }
                    if !self.ips.insert(n) {
                        return Err(invalid(
                            "spec.clusterIPs",
                            format!(
                                "Invalid value: []string{{{ip:?}}}: failed to allocate IP {ip}: provided IP is already allocated"
                            ),
                        ));
                    }
                    allocated_ip = Some(n);
                    ip.to_owned()
                }
                None => {
                    let n = self.allocate_ip(name)?;
                    allocated_ip = Some(n);
                    Ipv4Addr::from(n).to_string()
                }
            };
            spec.insert("clusterIP".into(), Value::String(ip.clone()));
            spec.insert("clusterIPs".into(), json!([ip]));
            spec.entry("ipFamilies").or_insert_with(|| json!(["IPv4"]));
            spec.entry("ipFamilyPolicy")
                .or_insert_with(|| "SingleStack".into());
            spec.entry("internalTrafficPolicy")
                .or_insert_with(|| "Cluster".into());
        }

        let result = self.admit_node_ports(name, new, old);
        if result.is_err()
            && let Some(n) = allocated_ip
        {
            self.ips.remove(&n);
        }
        result?;
        if new.get("status").is_none() {
            new["status"] = json!({"loadBalancer": {}});
        }
        Ok(())
    }

    fn admit_node_ports(
        &mut self,
        name: &str,
        new: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        let old_ports: Vec<(u64, String, u16)> = old
            .and_then(|o| o.pointer("/spec/ports"))
            .and_then(Value::as_array)
            .map(|ports| {
                ports
                    .iter()
                    .filter_map(|p| {
                        Some((
                            p.get("port")?.as_u64()?,
                            p.get("protocol")?.as_str()?.to_owned(),
                            u16::try_from(p.get("nodePort")?.as_u64()?).ok()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let wants = new.get("spec").is_some_and(is_node_port_type);
        let mut taken: Vec<u16> = Vec::new();
        let mut fail = None;
        if let Some(ports) = new.pointer_mut("/spec/ports").and_then(Value::as_array_mut) {
            for (i, port) in ports.iter_mut().enumerate() {
                let Some(p) = port.as_object_mut() else {
                    continue;
                };
                if !wants {
                    p.remove("nodePort");
                    continue;
                }
                let number = p.get("port").and_then(Value::as_u64).unwrap_or(0);
                let protocol = p
                    .get("protocol")
                    .and_then(Value::as_str)
                    .unwrap_or("TCP")
                    .to_owned();
                let kept = old_ports
                    .iter()
                    .find(|(n, pr, _)| *n == number && *pr == protocol)
                    .map(|(_, _, np)| *np);
                let asked = p.get("nodePort").and_then(Value::as_u64);
                let chosen = match asked {
                    Some(a) if Some(a) == kept.map(u64::from) => a as u16,
                    Some(a) => {
                        let a16 = u16::try_from(a).ok().filter(|a| NODE_PORTS.contains(a));
                        match a16 {
                            Some(a16)
                                if !self.node_ports.contains(&a16) && !taken.contains(&a16) =>
                            {
                                self.node_ports.insert(a16);
                                taken.push(a16);
                                a16
                            }
                            Some(_) => {
                                fail = Some(ApiError::invalid(
                                    "services",
                                    name,
                                    format!(
                                        "Service \"{name}\" is invalid: spec.ports[{i}].nodePort: Invalid value: {a}: provided port is already allocated"
                                    ),
                                ));
                                break;
                            }
                            None => {
                                fail = Some(ApiError::invalid(
                                    "services",
                                    name,
                                    format!(
                                        "Service \"{name}\" is invalid: spec.ports[{i}].nodePort: Invalid value: {a}: provided port is not in the valid range. The range of valid ports is 30000-32767"
                                    ),
                                ));
                                break;
                            }
                        }
                    }
                    None => match kept {
                        Some(k) => k,
                        None => match self.allocate_node_port(name) {
                            Ok(np) => {
                                taken.push(np);
                                np
                            }
                            Err(e) => {
                                fail = Some(e);
                                break;
                            }
                        },
                    },
                };
                p.insert("nodePort".into(), Value::from(chosen));
            }
        }
        if let Some(e) = fail {
            for p in taken {
                self.node_ports.remove(&p);
            }
            return Err(e);
        }
        // Old node ports the new object no longer uses go back to the pool.
        let now_used = node_ports(new);
        for (_, _, np) in old_ports {
            if !now_used.contains(&np) {
                self.node_ports.remove(&np);
            }
        }
        Ok(())
    }
}

fn cluster_ip(service: &Value) -> Option<u32> {
    service
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<Ipv4Addr>().ok())
        .map(u32::from)
}

fn node_ports(service: &Value) -> Vec<u16> {
    service
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ports| {
            ports
                .iter()
                .filter_map(|p| p.get("nodePort")?.as_u64())
                .filter_map(|p| u16::try_from(p).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc() -> Allocator {
        let (ip, len) = parse_cidr("10.96.0.0/24").unwrap();
        Allocator::new(ip, len)
    }

    #[test]
    fn allocates_keeps_and_frees() {
        let mut a = alloc();
        let mut s = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        a.admit("web", &mut s, None).unwrap();
        assert_eq!(s["spec"]["clusterIP"], "10.96.0.1");
        assert_eq!(s["spec"]["clusterIPs"], json!(["10.96.0.1"]));
        assert_eq!(s["spec"]["ports"][0]["nodePort"], 30000);
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 80);
        // A replace without clusterIP or nodePort keeps both.
        let mut r = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        a.admit("web", &mut r, Some(&s)).unwrap();
        assert_eq!(r["spec"]["clusterIP"], "10.96.0.1");
        assert_eq!(r["spec"]["ports"][0]["nodePort"], 30000);
        // Changing the IP is refused.
        let mut c = json!({"spec": {"clusterIP": "10.96.0.9"}});
        assert_eq!(a.admit("web", &mut c, Some(&s)).unwrap_err().code(), 422);
        // Headless stays headless.
        let mut h = json!({"spec": {"clusterIP": "None"}});
        a.admit("h", &mut h, None).unwrap();
        assert_eq!(h["spec"]["clusterIP"], "None");
        a.release(&r);
        let mut n = json!({"spec": {}});
        a.admit("next", &mut n, None).unwrap();
        assert_eq!(n["spec"]["clusterIP"], "10.96.0.1");
    }

    #[test]
    fn refuses_taken_and_out_of_range() {
        let mut a = alloc();
        let mut s = json!({"spec": {"clusterIP": "10.96.0.5"}});
        a.admit("a", &mut s, None).unwrap();
        let mut t = json!({"spec": {"clusterIP": "10.96.0.5"}});
        assert_eq!(a.admit("b", &mut t, None).unwrap_err().code(), 422);
        let mut o = json!({"spec": {"clusterIP": "10.97.0.5"}});
        assert_eq!(a.admit("c", &mut o, None).unwrap_err().code(), 422);
        let mut p = json!({"spec": {"ports": [{"port": 0}]}});
        assert_eq!(a.admit("d", &mut p, None).unwrap_err().code(), 422);
        assert!(parse_cidr("10.96.0.0").is_err());
    }
}
