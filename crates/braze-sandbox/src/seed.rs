//! Seeding users: a JSON or CSV file, `--user` flags, or generated users for benchmarks.

use std::path::Path;

use crate::store::{Alias, SandboxUser};

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("users file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("users file {path} is not a JSON array of users: {source}")]
    Json { path: String, source: serde_json::Error },
    #[error("users file {path}, line {line}: {reason}")]
    Csv { path: String, line: usize, reason: String },
    #[error("--user {spec:?}: {reason}; write e.g. external_id:u1,device_id:d1,alias_name:n,alias_label:l")]
    Spec { spec: String, reason: String },
}

/// Reads users from a JSON array (`[{"external_id": …, "aliases": [...], "device_ids": [...]}]`)
/// or, for a `.csv` file, CSV with a header naming any of `external_id`, `alias_name`,
/// `alias_label`, `device_id` (one alias and one device id a row; rows naming the same user
/// merge when seeded).
pub fn read_users_file(path: &Path) -> Result<Vec<SandboxUser>, SeedError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| SeedError::Read { path: shown.clone(), source })?;
    let is_csv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    if is_csv {
        parse_csv(&text).map_err(|(line, reason)| SeedError::Csv { path: shown, line, reason })
    } else {
        serde_json::from_str(&text).map_err(|source| SeedError::Json { path: shown, source })
    }
}

pub fn parse_csv(text: &str) -> Result<Vec<SandboxUser>, (usize, String)> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Ok(Vec::new());
    };
    let columns = split_csv_line(header).map_err(|r| (1, r))?;
    let position = |name: &str| columns.iter().position(|c| c.trim() == name);
    let (ext, name, label, device) =
        (position("external_id"), position("alias_name"), position("alias_label"), position("device_id"));
    if ext.is_none() && name.is_none() && device.is_none() {
        return Err((1, "the header names none of external_id, alias_name, device_id".into()));
    }
    if name.is_some() != label.is_some() {
        return Err((1, "alias_name and alias_label go together".into()));
    }
    let mut users = Vec::new();
    for (i, line) in lines {
        let fields = split_csv_line(line).map_err(|r| (i + 1, r))?;
        let cell = |at: Option<usize>| {
            at.and_then(|a| fields.get(a)).map(|s| s.trim()).filter(|s| !s.is_empty()).map(str::to_owned)
        };
        let mut user = SandboxUser { external_id: cell(ext), ..SandboxUser::default() };
        if let (Some(alias_name), Some(alias_label)) = (cell(name), cell(label)) {
            user.aliases.push(Alias { alias_name, alias_label });
        }
        user.device_ids.extend(cell(device));
        if user == SandboxUser::default() {
            return Err((i + 1, "a row with no identifier".into()));
        }
        users.push(user);
    }
    Ok(users)
}

/// Splits one CSV line; fields may be double-quoted with `""` for a quote.
fn split_csv_line(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', false) if field.is_empty() => quoted = true,
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', true) => quoted = false,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    fields.push(field);
    Ok(fields)
}

/// Parses `--user external_id:u1,device_id:d1,alias_name:n,alias_label:l` (values without
/// commas; device_id may repeat).
pub fn parse_user_spec(spec: &str) -> Result<SandboxUser, SeedError> {
    let fail = |reason: &str| SeedError::Spec { spec: spec.to_owned(), reason: reason.to_owned() };
    let mut user = SandboxUser::default();
    let (mut name, mut label) = (None, None);
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once(':').ok_or_else(|| fail("each part is key:value"))?;
        if value.is_empty() {
            return Err(fail("empty value"));
        }
        match key {
            "external_id" => user.external_id = Some(value.to_owned()),
            "device_id" => user.device_ids.push(value.to_owned()),
            "alias_name" => name = Some(value.to_owned()),
            "alias_label" => label = Some(value.to_owned()),
            _ => return Err(fail(&format!("unknown key {key:?}"))),
        }
    }
    match (name, label) {
        (Some(alias_name), Some(alias_label)) => user.aliases.push(Alias { alias_name, alias_label }),
        (None, None) => {}
        _ => return Err(fail("alias_name and alias_label go together")),
    }
    if user == SandboxUser::default() {
        return Err(fail("no identifier"));
    }
    Ok(user)
}

/// `count` identified users `{prefix}{i}`, for benchmarks.
pub fn generated_users(prefix: &str, count: u32) -> impl Iterator<Item = SandboxUser> + '_ {
    (0..count).map(move |i| SandboxUser::identified(format!("{prefix}{i}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_become_users() {
        let users = parse_csv(
            "external_id,alias_name,alias_label,device_id\n\
             u1,,,\n\
             ,\"n,1\",crm,\n\
             ,,,d9\n\
             u2,,,d-old\n",
        )
        .unwrap();
        assert_eq!(users.len(), 4);
        assert_eq!(users[0], SandboxUser::identified("u1"));
        assert_eq!(users[1], SandboxUser::alias("n,1", "crm"));
        assert_eq!(users[2], SandboxUser::anonymous("d9"));
        assert_eq!(users[3].device_ids, ["d-old"]);
        assert_eq!(parse_csv("device_id\n\n,\n").unwrap_err().0, 3);
        assert!(parse_csv("alias_name\nx\n").is_err());
        assert!(parse_csv("external_id\n\"open\n").is_err());
    }

    #[test]
    fn user_specs() {
        let u = parse_user_spec("external_id:u1,device_id:d1,device_id:d2").unwrap();
        assert_eq!(u.external_id.as_deref(), Some("u1"));
        assert_eq!(u.device_ids, ["d1", "d2"]);
        let u = parse_user_spec("alias_name:a@b.c,alias_label:email").unwrap();
        assert_eq!(u, SandboxUser::alias("a@b.c", "email"));
        for bad in ["", "external_id", "alias_name:x", "colour:red", "external_id:"] {
            assert!(parse_user_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_file_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.json");
        std::fs::write(&path, r#"[{"external_id":"u1"},{"device_ids":["d"]}]"#).unwrap();
        assert_eq!(read_users_file(&path).unwrap().len(), 2);
        std::fs::write(&path, "{}").unwrap();
        assert!(read_users_file(&path).unwrap_err().to_string().contains("users.json"));
    }
}
