# Print the resolv.conf `options` line that cloud-init's resolv_conf module
# would write from a #cloud-config document (block style, as vmlet writes its
# vendor-data): only with `manage_resolv_conf: true`, from the mapping
# `resolv_conf: options:` (`name: true` -> name, `name: N` -> name:N, false
# dropped). Items that are not resolv.conf syntax (NAME or NAME:NUMBER) are
# skipped: they could end the line or start another directive.
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
function unquote(s) {
    if (length(s) >= 2 && ((s ~ /^".*"$/) || (s ~ /^'.*'$/)))
        s = substr(s, 2, length(s) - 2)
    return s
}
function indent(s) { match(s, /^[ \t]*/); return RLENGTH }
{ sub(/\r$/, "") }
/^[ \t]*(#.*)?$/ { next }
/^[^ \t]/ {
    inrc = 0; inopt = 0
    if ($0 ~ /^manage_resolv_conf:/) {
        v = $0; sub(/^manage_resolv_conf:/, "", v); sub(/[ \t]#.*/, "", v); v = tolower(unquote(trim(v)))
        manage = (v == "true" || v == "yes" || v == "on")
    } else if ($0 ~ /^resolv_conf:[ \t]*$/) {
        inrc = 1
    }
    next
}
inrc && inopt && indent($0) <= optindent { inopt = 0 }
inrc && !inopt && /^[ \t]+options:[ \t]*$/ { inopt = 1; optindent = indent($0); next }
inrc && inopt {
    line = trim($0)
    k = line; sub(/:.*/, "", k); k = unquote(trim(k))
    v = line; sub(/^[^:]*:/, "", v); sub(/[ \t]#.*/, "", v); v = unquote(trim(v))
    if (v == "true" || v == "True") tok = k
    else if (v == "false" || v == "False") next
    else tok = k ":" v
    if (tok ~ /^[a-z][a-z0-9_-]*(:[0-9]+)?$/) out = out " " tok
}
END { if (manage && out != "") print "options" out }
