<?xml version="1.0" encoding="UTF-8"?>
<!-- Legacy `archive` (公文交换箱 / SFTP drop, shared/legacy/README.md sections 2 and 3)  ->
     canonical envelope (规范信封) with a documents payload (urn:egov:gateway:documents:v1).

     Header mapping only: file contents (base64) are decoded and verified by
     adapters/archive.py; here each <file> becomes an <attachment> claim check.

     Parameters (XSLT string parameters):
       created   ISO 8601 date-time for header/created (the archive format carries none)
-->
<xsl:stylesheet version="1.0"
    xmlns:xsl="http://www.w3.org/1999/XSL/Transform"
    xmlns="urn:egov:gateway:envelope:v1">

  <xsl:param name="created" select="''"/>

  <xsl:template match="/archive">
    <xsl:variable name="p" select="archiveparameters"/>
    <envelope version="1">
      <header>
        <!-- The archiveid is the document's identity at the legacy side: keep it. -->
        <message-id><xsl:value-of select="@archiveid"/></message-id>
        <subsystem>documents</subsystem>
        <type>document</type>
        <created><xsl:value-of select="$created"/></created>
        <sender unit="{sender/@trustorgno}">
          <xsl:if test="sender/@name != ''">
            <xsl:attribute name="name"><xsl:value-of select="sender/@name"/></xsl:attribute>
          </xsl:if>
        </sender>
        <recipients>
          <xsl:for-each select="receivers/receiver">
            <recipient unit="{@trustorgno}">
              <xsl:if test="@name != ''">
                <xsl:attribute name="name"><xsl:value-of select="@name"/></xsl:attribute>
              </xsl:if>
              <xsl:if test="@type != ''">
                <xsl:attribute name="copy-type"><xsl:value-of select="@type"/></xsl:attribute>
              </xsl:if>
              <xsl:if test="@num != ''">
                <xsl:attribute name="copy-no"><xsl:value-of select="@num"/></xsl:attribute>
              </xsl:if>
            </recipient>
          </xsl:for-each>
        </recipients>
        <classification>
          <xsl:if test="$p/secret/@period != ''">
            <xsl:attribute name="period"><xsl:value-of select="$p/secret/@period"/></xsl:attribute>
          </xsl:if>
          <xsl:value-of select="$p/secret/@grade"/>
        </classification>
        <urgency><xsl:value-of select="$p/urgency"/></urgency>
      </header>
      <payload>
        <document xmlns="urn:egov:gateway:documents:v1">
          <doc-type><xsl:value-of select="$p/doctype"/></doc-type>
          <issuer><xsl:value-of select="sender/@name"/></issuer>
          <doc-number prefix="{$p/docno/@prefix}" year="{$p/docno/@year}" serial="{$p/docno/@serial}">
            <xsl:value-of select="concat($p/docno/@prefix, '〔', $p/docno/@year, '〕', $p/docno/@serial, '号')"/>
          </doc-number>
          <title><xsl:value-of select="$p/title"/></title>
          <!-- an empty <signer/> (a 通知 has none) or <publishlevel/> means none: the payload
               leaves the element out rather than carry an empty one its XSD refuses -->
          <xsl:if test="normalize-space($p/signer) != ''">
            <signer><xsl:value-of select="$p/signer"/></signer>
          </xsl:if>
          <written-date><xsl:value-of select="$p/writtendate"/></written-date>
          <xsl:if test="normalize-space($p/publishlevel) != ''">
            <publish-level><xsl:value-of select="$p/publishlevel"/></publish-level>
          </xsl:if>
          <sealed><xsl:value-of select="$p/sealed"/></sealed>
          <xsl:if test="$p/printer">
            <printer name="{$p/printer/@name}" date="{$p/printer/@date}"/>
          </xsl:if>
        </document>
      </payload>
      <xsl:if test="files/file">
        <attachments>
          <xsl:for-each select="files/file">
            <attachment name="{@name}" size="{@size}" sha256="{@sha256}">
              <xsl:attribute name="role">
                <xsl:choose>
                  <xsl:when test="@type = 'document'">body</xsl:when>
                  <xsl:otherwise>attachment</xsl:otherwise>
                </xsl:choose>
              </xsl:attribute>
            </attachment>
          </xsl:for-each>
        </attachments>
      </xsl:if>
    </envelope>
  </xsl:template>
</xsl:stylesheet>
