<?xml version="1.0" encoding="UTF-8"?>
<!-- Canonical envelope (规范信封) carrying a documents payload  ->  legacy `archive` header
     (公文交换箱 / SFTP drop, fixed contract: shared/legacy/README.md sections 2 and 3).

     One archive is written per receiver: the receiver is chosen by $receiver-unit.
     <file> elements are empty placeholders; adapters/archive.py streams each file's base64
     content between the serialised parts, so the transform never sees file bytes.

     Parameters (XSLT string parameters):
       archive-id      the archive's archiveid (Delivery.remote_ref)
       receiver-unit   unified social credit code of the one receiver
       sender-appid    the sender's application id at the box ('' = unknown, attribute omitted)
       receiver-appid  the receiver's application id ('' = unknown, attribute omitted)
-->
<xsl:stylesheet version="1.0"
    xmlns:xsl="http://www.w3.org/1999/XSL/Transform"
    xmlns:e="urn:egov:gateway:envelope:v1"
    xmlns:d="urn:egov:gateway:documents:v1"
    exclude-result-prefixes="e d">

  <xsl:param name="archive-id" select="''"/>
  <xsl:param name="receiver-unit" select="''"/>
  <xsl:param name="sender-appid" select="''"/>
  <xsl:param name="receiver-appid" select="''"/>

  <xsl:template match="/e:envelope">
    <xsl:variable name="h" select="e:header"/>
    <xsl:variable name="doc" select="e:payload/d:document"/>
    <xsl:variable name="r" select="$h/e:recipients/e:recipient[@unit = $receiver-unit][1]"/>
    <archive action="sendArchive" version="2.1" archiveid="{$archive-id}">
      <sender trustorgno="{$h/e:sender/@unit}">
        <xsl:if test="$sender-appid != ''">
          <xsl:attribute name="appid"><xsl:value-of select="$sender-appid"/></xsl:attribute>
        </xsl:if>
        <xsl:attribute name="name">
          <xsl:choose>
            <xsl:when test="$h/e:sender/@name"><xsl:value-of select="$h/e:sender/@name"/></xsl:when>
            <xsl:otherwise><xsl:value-of select="$doc/d:issuer"/></xsl:otherwise>
          </xsl:choose>
        </xsl:attribute>
      </sender>
      <receivers>
        <receiver trustorgno="{$receiver-unit}">
          <xsl:if test="$receiver-appid != ''">
            <xsl:attribute name="appid"><xsl:value-of select="$receiver-appid"/></xsl:attribute>
          </xsl:if>
          <xsl:if test="$r/@name">
            <xsl:attribute name="name"><xsl:value-of select="$r/@name"/></xsl:attribute>
          </xsl:if>
          <!-- 主送 is the legacy default when the envelope leaves the copy type open. -->
          <xsl:attribute name="type">
            <xsl:choose>
              <xsl:when test="$r/@copy-type"><xsl:value-of select="$r/@copy-type"/></xsl:when>
              <xsl:otherwise>主送</xsl:otherwise>
            </xsl:choose>
          </xsl:attribute>
          <xsl:attribute name="count">1</xsl:attribute>
          <!-- The box wants a copy number on every receiver (samples/archive-send.xml numbers a
               非密 document's copies too): the 份号, or else the copy's place in the recipient
               list, six digits, as the sample has it. -->
          <xsl:attribute name="num">
            <xsl:choose>
              <xsl:when test="$r/@copy-no"><xsl:value-of select="$r/@copy-no"/></xsl:when>
              <xsl:otherwise><xsl:value-of select="format-number(count($r/preceding-sibling::e:recipient) + 1, '000000')"/></xsl:otherwise>
            </xsl:choose>
          </xsl:attribute>
        </receiver>
      </receivers>
      <archiveparameters>
        <title><xsl:value-of select="$doc/d:title"/></title>
        <xsl:variable name="dn" select="$doc/d:doc-number"/>
        <docno>
          <!-- Prefer the split attributes; otherwise split the text 州政办发〔2026〕37号. -->
          <xsl:attribute name="prefix">
            <xsl:choose>
              <xsl:when test="$dn/@prefix"><xsl:value-of select="$dn/@prefix"/></xsl:when>
              <xsl:otherwise><xsl:value-of select="substring-before($dn, '〔')"/></xsl:otherwise>
            </xsl:choose>
          </xsl:attribute>
          <xsl:attribute name="year">
            <xsl:choose>
              <xsl:when test="$dn/@year"><xsl:value-of select="$dn/@year"/></xsl:when>
              <xsl:otherwise><xsl:value-of select="substring-before(substring-after($dn, '〔'), '〕')"/></xsl:otherwise>
            </xsl:choose>
          </xsl:attribute>
          <xsl:attribute name="serial">
            <xsl:choose>
              <xsl:when test="$dn/@serial"><xsl:value-of select="$dn/@serial"/></xsl:when>
              <xsl:otherwise><xsl:value-of select="substring-before(substring-after($dn, '〕'), '号')"/></xsl:otherwise>
            </xsl:choose>
          </xsl:attribute>
        </docno>
        <secret grade="{$h/e:classification}" period="{$h/e:classification/@period}"/>
        <urgency><xsl:value-of select="$h/e:urgency"/></urgency>
        <doctype><xsl:value-of select="$doc/d:doc-type"/></doctype>
        <signer><xsl:value-of select="$doc/d:signer"/></signer>
        <publishlevel><xsl:value-of select="$doc/d:publish-level"/></publishlevel>
        <sealed>
          <xsl:choose>
            <xsl:when test="$doc/d:sealed"><xsl:value-of select="$doc/d:sealed"/></xsl:when>
            <xsl:otherwise>false</xsl:otherwise>
          </xsl:choose>
        </sealed>
        <writtendate><xsl:value-of select="$doc/d:written-date"/></writtendate>
        <xsl:if test="$doc/d:printer">
          <printer name="{$doc/d:printer/@name}" date="{$doc/d:printer/@date}"/>
        </xsl:if>
      </archiveparameters>
      <files>
        <!-- The body (正文) first, then attachments (附件), each in envelope order. -->
        <xsl:for-each select="e:attachments/e:attachment[@role = 'body']">
          <file type="document" name="{@name}" size="{@size}" sha256="{@sha256}"/>
        </xsl:for-each>
        <xsl:for-each select="e:attachments/e:attachment[@role != 'body']">
          <file type="attachment" name="{@name}" size="{@size}" sha256="{@sha256}"/>
        </xsl:for-each>
      </files>
    </archive>
  </xsl:template>
</xsl:stylesheet>
