//! `isthmus-certs inspect`: a human report on every certificate in a PEM file. Pure: takes the
//! PEM bytes and the current time, returns text and the list of validity problems.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::extensions::GeneralName;

/// What `inspect` prints, and why it should exit non-zero (empty when all certificates are
/// currently valid).
pub(crate) struct Report {
    pub(crate) text: String,
    pub(crate) problems: Vec<String>,
}

pub(crate) fn report(pem: &[u8], origin: &str, now: OffsetDateTime) -> Result<Report> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{origin}: malformed PEM"))?;
    if certs.is_empty() {
        bail!("{origin}: no PEM CERTIFICATE section found");
    }
    let mut text = String::new();
    let mut problems = Vec::new();
    for (index, der) in certs.iter().enumerate() {
        let (_, x509) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("{origin}: certificate #{index} is not valid X.509"))?;

        let (mut dns, mut ips, mut uris) = (Vec::new(), Vec::new(), Vec::new());
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => dns.push((*n).to_owned()),
                    GeneralName::URI(u) => uris.push((*u).to_owned()),
                    GeneralName::IPAddress(bytes) => ips.push(ip_string(bytes)),
                    _ => {}
                }
            }
        }
        let spiffe = match isthmus_certs::spiffe_id_of(der) {
            Ok(id) => id.to_string(),
            Err(e) => match ca_trust_domain(&uris) {
                Some(td) if x509.is_ca() => format!("- (CA of trust domain {td})"),
                _ => format!("none ({e})"),
            },
        };
        let not_before = x509.validity().not_before.to_datetime();
        let not_after = x509.validity().not_after.to_datetime();
        let left = if now < not_before {
            let msg = format!(
                "certificate #{index} is not valid yet: valid from {} (in {})",
                rfc3339(not_before),
                human(not_before - now)
            );
            problems.push(msg);
            format!("not valid yet, starts in {}", human(not_before - now))
        } else if now >= not_after {
            let msg = format!(
                "certificate #{index} expired at {} ({} ago)",
                rfc3339(not_after),
                human(now - not_after)
            );
            problems.push(msg);
            format!("expired {} ago", human(now - not_after))
        } else {
            human(not_after - now)
        };

        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                v.join(", ")
            }
        };
        if index > 0 {
            text.push('\n');
        }
        let _ = writeln!(text, "certificate #{index}");
        let _ = writeln!(text, "  subject:     {}", x509.subject());
        let _ = writeln!(text, "  issuer:      {}", x509.issuer());
        let _ = writeln!(
            text,
            "  serial:      {}",
            x509.tbs_certificate.serial.to_str_radix(16)
        );
        let _ = writeln!(text, "  SPIFFE ID:   {spiffe}");
        let _ = writeln!(text, "  DNS SANs:    {}", list(&dns));
        let _ = writeln!(text, "  IP SANs:     {}", list(&ips));
        let _ = writeln!(text, "  URI SANs:    {}", list(&uris));
        let _ = writeln!(text, "  not before:  {}", rfc3339(not_before));
        let _ = writeln!(text, "  not after:   {}", rfc3339(not_after));
        let _ = writeln!(text, "  time left:   {left}");
        let _ = writeln!(
            text,
            "  CA:          {}",
            if x509.is_ca() { "yes" } else { "no" }
        );
    }
    Ok(Report { text, problems })
}

fn ca_trust_domain(uris: &[String]) -> Option<&str> {
    uris.iter().find_map(|u| {
        let td = u.strip_prefix("spiffe://")?;
        (!td.is_empty() && !td.contains('/')).then_some(td)
    })
}

fn ip_string(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).unwrap_or_default()).to_string(),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).unwrap_or_default()).to_string(),
        _ => format!("<{} bytes>", bytes.len()),
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// The two largest units of a duration, dropping a zero second unit: `23h 59m`, `3h`, `2d 4h`,
/// `45s`.
pub(crate) fn human(d: time::Duration) -> String {
    let secs = Duration::try_from(d.abs()).map_or(0, |d| d.as_secs());
    let units = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3600, "h"),
        (secs % 3600 / 60, "m"),
        (secs % 60, "s"),
    ];
    let Some(first) = units.iter().position(|(n, _)| *n > 0) else {
        return "0s".to_owned();
    };
    let (n, unit) = units[first];
    match units.get(first + 1) {
        Some((m, next)) if *m > 0 => format!("{n}{unit} {m}{next}"),
        _ => format!("{n}{unit}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        let h = |s: i64| human(time::Duration::seconds(s));
        assert_eq!(h(0), "0s");
        assert_eq!(h(45), "45s");
        assert_eq!(h(90), "1m 30s");
        assert_eq!(h(3 * 3600 + 12), "3h");
        assert_eq!(h(23 * 3600 + 59 * 60 + 59), "23h 59m");
        assert_eq!(h(2 * 86_400 + 4 * 3600 + 5), "2d 4h");
        assert_eq!(h(-(3 * 3600)), "3h");
    }
}
